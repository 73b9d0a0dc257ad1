"""Datasets for `python -m fused_resnet train`, deterministic and offline by default.

    digits     scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes, shipped
               with scikit-learn: no download), upscaled bilinearly to image_size x
               image_size, 3 channels, normalised; a fixed stratified 80/20 train/val split
    synthetic  a generated 10-class task of oriented gratings plus noise (no dependency)
    PATH       an ImageFolder directory: PATH/train and PATH/val (or PATH/val missing:
               a fixed 90/10 split of PATH); ImageNet-style augmentation for training

The in-memory ones (digits, synthetic) are tensors; training augments them on the
batch (random shifts of up to 1/8 of the image), seeded by (seed, step) so that a run
is reproducible and resumable to the bit, and identical for every number of ranks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset


@dataclass
class Data:
    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    image_size: int
    in_memory: bool        # tensors: augmented on the batch by `augment`


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(idx.numel() * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _normalised(images: Tensor, train_idx: Tensor) -> Tensor:
    mean = images[train_idx].mean()
    std = images[train_idx].std()
    return (images - mean) / std


def digits_images(image_size: int = 32) -> tuple:
    """All 1797 of scikit-learn's digits, upscaled bilinearly to image_size x image_size
    and repeated to 3 channels, in [0, 1] (not normalised), and their int64 labels."""
    try:  # imported here: scikit-learn is an optional dependency
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError("the 'digits' dataset needs scikit-learn (pip install scikit-learn); "
                           "use --data synthetic or an ImageFolder path instead") from err
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0     # N,1,8,8 in [0,1]
    y = torch.tensor(d.target, dtype=torch.int64)
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                        align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return x, y


def digits(image_size: int = 32, seed: int = 0) -> Data:
    """scikit-learn's digits, upscaled to image_size, 3 channels, 80/20 stratified split."""
    x, y = digits_images(image_size)
    train_idx, val_idx = _stratified_split(y, 0.2, seed)
    x = _normalised(x, train_idx)
    return Data("digits", TensorDataset(x[train_idx], y[train_idx]),
                TensorDataset(x[val_idx], y[val_idx]), 10, image_size, True)


def synthetic(image_size: int = 32, seed: int = 0, n_train: int = 2000,
              n_val: int = 500) -> Data:
    """10 classes of oriented sinusoidal gratings (class = orientation), random phase,
    frequency and colour, plus noise: learnable, not trivial, generated."""
    gen = torch.Generator().manual_seed(seed + 12345)
    n = n_train + n_val
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=gen)]
    theta = y.float() * math.pi / 10 + torch.randn(n, generator=gen) * 0.05
    freq = 2 * math.pi * (1.5 + 2.5 * torch.rand(n, generator=gen)) / image_size
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    r = torch.arange(image_size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    proj = (xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None])
    wave = torch.sin(proj * freq[:, None, None] + phase[:, None, None])
    colour = torch.rand(n, 3, generator=gen) * 0.8 + 0.2
    x = wave[:, None] * colour[:, :, None, None]
    x = x + 0.6 * torch.randn(x.shape, generator=gen)
    train_idx, val_idx = torch.arange(n_train), torch.arange(n_train, n)
    x = _normalised(x, train_idx)
    return Data("synthetic", TensorDataset(x[train_idx], y[train_idx]),
                TensorDataset(x[val_idx], y[val_idx]), 10, image_size, True)


def image_folder(path: str, image_size: int = 224, seed: int = 0) -> Data:
    """An ImageFolder dataset: PATH/train + PATH/val, or PATH split 90/10 (stratified)."""
    # imported here: only this data set needs torchvision's datasets (and PIL behind them)
    from torchvision import datasets, transforms
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    resize = int(round(image_size * 256 / 224))
    val_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), normalize])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path!r}: no such directory (expected an ImageFolder "
                                "directory, or 'digits' / 'synthetic')")
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train = datasets.ImageFolder(train_dir, train_tf)
        val = datasets.ImageFolder(val_dir, val_tf)
        if val.classes != train.classes:
            raise ValueError(f"{val_dir} and {train_dir} have different classes")
        classes = train.classes
    else:
        base_train = datasets.ImageFolder(path, train_tf)
        base_val = datasets.ImageFolder(path, val_tf)
        labels = torch.tensor(base_train.targets)
        train_idx, val_idx = _stratified_split(labels, 0.1, seed)
        train, val = Subset(base_train, train_idx.tolist()), Subset(base_val, val_idx.tolist())
        classes = base_train.classes
    return Data(os.path.basename(os.path.normpath(path)) or path, train, val, len(classes),
                image_size, False)


# Below this many images every one is opened to check it reads; above, the first of
# each class (a full check of ImageNet would take longer than many runs).
_VERIFY_ALL_UP_TO = 2000


def image_folder_problem(path: str) -> Optional[str]:
    """What makes `path` unusable as --data (None when nothing): not a directory, no class
    subdirectories, no images, an image that does not open."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not os.path.isdir(path):
        return ("no such directory (expected an ImageFolder directory PATH/<class>/<image>, "
                "or 'digits' / 'synthetic')")
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    roots = [train_dir, val_dir] if os.path.isdir(train_dir) and os.path.isdir(val_dir) \
        else [path]
    for root in roots:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            return f"{root} has no class subdirectories (ImageFolder reads ROOT/<class>/<image>)"
        images = {}
        for c in classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        images.setdefault(c, []).append(os.path.join(dirpath, f))
        if not images:
            return (f"{root} has no images (extensions {', '.join(IMG_EXTENSIONS)}) in its "
                    f"{len(classes)} class directories")
        total = sum(len(v) for v in images.values())
        to_check = [f for v in images.values() for f in v] if total <= _VERIFY_ALL_UP_TO \
            else [v[0] for v in images.values()]
        for f in to_check:
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as err:   # PIL raises many kinds for a broken file
                return f"cannot read the image {f} ({type(err).__name__}: {err})"
    return None


def load(name_or_path: str = "digits", image_size: Optional[int] = None, seed: int = 0) -> Data:
    """`digits`, `synthetic` or an ImageFolder path."""
    if name_or_path in (None, "", "digits"):
        return digits(image_size or 32, seed)
    if name_or_path == "synthetic":
        return synthetic(image_size or 32, seed)
    return image_folder(name_or_path, image_size or 224, seed)


def augment(x: Tensor, seed: int, step: int, max_shift: Optional[int] = None) -> Tensor:
    """Random translations (zero padding) of a batch of in-memory images, one per image,
    drawn from a generator seeded by (seed, step): the same for every rank count when
    applied to the global batch before sharding."""
    n, _, h, w = x.shape
    pad = max(1, h // 8) if max_shift is None else max_shift
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=gen)
    shifts = shifts.to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device)[None] + pad + shifts[:, :1]        # n, h
    cols = torch.arange(w, device=x.device)[None] + pad + shifts[:, 1:]        # n, w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class GlobalBatches:
    """The training batches, as lists of dataset indices: a fixed permutation per epoch
    (seed, epoch), cut into global batches of `batch` images (the last partial one
    dropped); rank r of `world` takes its contiguous share of each global batch
    (sizes differ by at most one). Starting at any global step (resume) is exact.

    Unlike torch's DistributedSampler (which deals every world-th image to a rank), a
    global batch here is the same set of images for every number of ranks, so with
    sync BN a K-rank run computes what a one-process run computes."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        if batch > n:
            raise ValueError(f"batch size {batch} is larger than the training set ({n} images)")
        if batch < world:
            raise ValueError(f"global batch {batch} is smaller than the number of ranks {world}")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.steps_per_epoch = n // batch
        sizes = [batch // world + (1 if r < batch % world else 0) for r in range(world)]
        self.local_sizes = sizes
        self.offset = sum(sizes[:rank])
        self.local = sizes[rank]

    def epoch_order(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=gen)

    def global_indices(self, step: int) -> Tensor:
        """The indices of the whole global batch of `step` (all ranks)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[i * self.batch:(i + 1) * self.batch]

    def local_slice(self) -> slice:
        return slice(self.offset, self.offset + self.local)

    def indices(self, step: int) -> Tensor:
        return self.global_indices(step)[self.local_slice()]
