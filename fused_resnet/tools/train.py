"""Train a fused ResNet (and torchvision's, with --compare): curves, checkpoints, DDP.

    python -m fused_resnet train                          # resnet18 on digits, CPU, minutes
    python -m fused_resnet train --compare --out runs/r18 # + torchvision from the same init
    python -m fused_resnet train --model resnet50 --data /data/imagenet --epochs 90 \\
        --batch 256 --schedule step --compare             # a GPU: AMP + channels_last on
    torchrun --nproc-per-node 2 -m fused_resnet train ...  # data-parallel, sync BN (gloo/NCCL)

SGD with momentum 0.9 and weight decay 1e-4 (He et al. 2016), learning rate
0.1 x batch/256 unless --lr, on a cosine or the paper's step schedule (x0.1 at 50% and
75% of the steps, optional linear warm-up). With --compare the torchvision model starts
from the fused model's initial weights and sees the same batches in the same order, so
the two loss curves coincide at first and drift apart only through rounding (in fp64
they coincide over the whole run).

Data: --data digits (default: scikit-learn's real 8x8 digits, upscaled, offline),
synthetic (generated), or an ImageFolder path. The training batches are global: step s
uses the same images for any number of ranks; under torchrun each rank takes its share
and the fused model's batch norm is synchronised (convert_sync_batchnorm), so K ranks
compute what one process computes. Only rank 0 shows the progress bar and writes files.

Files in --out (default runs/train), named --name: NAME.json (curves of both models and
the run's environment), NAME.png (loss / accuracy / fused-vs-torchvision loss gap) and
NAME.ckpt.pt (a checkpoint whose "state_dict" loads into torchvision's model, strict;
--resume it to continue the run exactly where it stopped).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torchvision
from torch import nn

import fused_resnet

from . import degradation, launch, loop, report
from .arguments import (CIFAR_MODELS, MODELS, backend_name, non_negative_float,
                        non_negative_int, positive_float, positive_int, training_batch,
                        unwritable, usage_error)
from .data import GlobalBatches, augment, image_folder_problem
from .data import load as load_data

# Arguments a resumed run takes from its checkpoint unless given again.
_RESUMED = {"model": "resnet18", "data": "digits", "image_size": None, "batch": 64, "lr": None,
            "schedule": "cosine", "warmup": 0, "epochs": None, "steps": None, "seed": 0,
            "compare": False, "dtype": "fp32", "momentum": 0.9, "weight_decay": 1e-4,
            "eval_every": None}
_DEFAULT_EPOCHS = {"digits": 6, "synthetic": 6}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=MODELS + CIFAR_MODELS, default=None,
                   help="default: resnet18")
    g.add_argument("--data", default=None, metavar="digits|synthetic|PATH",
                   help="default: digits (scikit-learn, offline); or an ImageFolder directory "
                        "(PATH/train + PATH/val, or PATH split 90/10)")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="default: 32 for digits/synthetic, 224 for an ImageFolder")
    g.add_argument("--workers", type=non_negative_int, default=4, help="ImageFolder loader processes")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_float, default=None,
                   help="default: 6 on digits/synthetic, 90 on an ImageFolder")
    g.add_argument("--steps", type=positive_int, default=None, help="total optimizer steps (overrides "
                   "--epochs)")
    g.add_argument("--batch", type=training_batch, default=None,
                   help="global batch size, shared by the ranks (default 64)")
    g.add_argument("--lr", type=positive_float, default=None, help="default: 0.1 x batch / 256")
    g.add_argument("--momentum", type=non_negative_float, default=None, help="default 0.9")
    g.add_argument("--weight-decay", type=non_negative_float, default=None, help="default 1e-4")
    g.add_argument("--schedule", choices=("cosine", "step"), default=None,
                   help="cosine (default) or the paper's step schedule (x0.1 at 50%% and 75%%)")
    g.add_argument("--warmup", type=non_negative_int, default=None, help="linear warm-up steps (default 0)")
    g.add_argument("--seed", type=int, default=None, help="initialisation, data order and "
                   "augmentation (default 0)")
    g = p.add_argument_group("execution")
    g.add_argument("--compare", action="store_true", default=None,
                   help="also train torchvision's model from the same initialisation on the "
                        "same batches")
    g.add_argument("--compare-plain", action="store_true",
                   help="the degradation experiment instead: train the plain (no shortcut) and "
                        "the residual (option A) network of --model's depth on digits, plot "
                        "their training error (fused_resnet/degradation.py)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    g.add_argument("--backend", type=backend_name, default=None, help="fused_resnet backend (auto, cpu, cuda, "
                   "triton, reference)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast (default: on for GPU, off for CPU)")
    g.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="autocast dtype (fp16 uses a gradient scaler)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on for GPU, off for CPU)")
    g.add_argument("--dtype", choices=("fp32", "fp64"), default=None,
                   help="parameter and input dtype (fp64: exact fused-vs-torchvision checks)")
    g.add_argument("--compile", action="store_true", help="torch.compile the models")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    g.add_argument("--name", default=None,
                   help="file name stem (default train_<device>_<model>_<data>)")
    g.add_argument("--eval-every", type=positive_int, default=None,
                   help="evaluate (and checkpoint) every N steps (default: every epoch)")
    g.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")
    g.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="write checkpoints (default on)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep NAME.step<N>.ckpt.pt at every evaluation")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# --- data and models ------------------------------------------------------------------------

def _lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The learning rate of `step` over the base one: linear warm-up, then cosine or step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return 0.1 ** ((step >= total * 0.5) + (step >= total * 0.75))
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _amp_dtype(args) -> Optional[torch.dtype]:
    return report.DTYPES[args.amp_dtype] if args.amp else None


def _to_input(x: torch.Tensor, args, device) -> torch.Tensor:
    x = x.to(device, dtype=args.torch_dtype, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def _val_batches(data, args, device, rank, world, batch: int = 256):
    if data.in_memory:
        x_all, y_all = data.val.tensors
        idx = torch.arange(rank, len(data.val), world)
        for i in range(0, idx.numel(), batch):
            j = idx[i:i + batch]
            yield _to_input(x_all[j], args, device), y_all[j].to(device)
        return
    sub = torch.utils.data.Subset(data.val, list(range(rank, len(data.val), world)))
    loader = torch.utils.data.DataLoader(sub, batch_size=max(1, args.batch // world),
                                         num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    for x, y in loader:
        yield _to_input(x, args, device), y.to(device, non_blocking=True)


class _StepBatches(torch.utils.data.Sampler):
    """Batch sampler: this rank's indices of global steps start..total-1 (ImageFolder)."""

    def __init__(self, batches, start: int, total: int):
        self.batches, self.start, self.total = batches, start, total

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.batches.indices(step).tolist()

    def __len__(self) -> int:
        return self.total - self.start


def _train_batches(data, batches, args, device, start: int, total: int):
    if data.in_memory:
        x_all, y_all = data.train.tensors
        for step in range(start, total):
            idx = batches.global_indices(step)
            x = augment(x_all[idx], args.seed, step)[batches.local_slice()]
            yield _to_input(x, args, device), y_all[idx][batches.local_slice()].to(device)
        return
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=_StepBatches(batches, start,
                                                                               total),
                                         num_workers=args.workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    for x, y in loader:
        yield _to_input(x, args, device), y.to(device, non_blocking=True)


def _build(args, num_classes: int, device, world: int) -> tuple:
    torch.manual_seed(args.seed)
    fused = getattr(fused_resnet, args.model)(num_classes=num_classes)
    tv_model = None
    if args.compare:
        tv_model = getattr(torchvision.models, args.model)(num_classes=num_classes)
        tv_model.load_state_dict(fused.state_dict(), strict=True)   # the same initialisation
    models = []
    for m in (fused, tv_model):
        if m is None:
            models.append(None)
            continue
        m = m.to(device=device, dtype=args.torch_dtype)
        if args.channels_last:
            m = m.to(memory_format=torch.channels_last)
        if world > 1:
            if m is fused or device.type != "cuda":
                # fused: sync BN inside the fused operators. torchvision's on CPU: torch's
                # SyncBatchNorm needs CUDA, so its BN layers use ours (its blocks stay
                # torchvision's); on GPU it gets torch.nn.SyncBatchNorm.
                m = fused_resnet.convert_sync_batchnorm(m)
            else:
                m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
            m = nn.parallel.DistributedDataParallel(
                m, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            m = torch.compile(m)
        models.append(m)
    return models[0], models[1]


# --- the plot --------------------------------------------------------------------------------

def _ema(values: list) -> list:
    """The exponential moving average (decay 0.9) of `values`, starting at the first."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        out.append(ema)
    return out


def _plot(path: Path, histories: dict, title: str) -> Optional[Path]:
    plt = report.pyplot()
    if plt is None:
        return None
    colors = {"fused": "#c44e52", "torchvision": "#4c72b0"}
    n_panels = 3 if "torchvision" in histories else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 4.4))
    for label, h in histories.items():
        steps, loss = h["step"], h["loss"]
        c = colors.get(label)
        axes[0].plot(steps, loss, color=c, alpha=0.35, lw=0.8)
        axes[0].plot(steps, _ema(loss), color=c, lw=1.6, label=f"{label} (EMA 0.9)")
        ev = h["eval"]
        axes[1].plot(ev["step"], [100 * a for a in ev["acc"]], "o-", color=c, lw=1.6, ms=4,
                     label=f"{label} val")
        axes[1].plot(steps, [100 * a for a in _ema(h["train_acc"])], "--", color=c, lw=1.0,
                     alpha=0.7, label=f"{label} train (EMA)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    if n_panels == 3:
        f, t = histories["fused"], histories["torchvision"]
        common = min(len(f["loss"]), len(t["loss"]))
        gap = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(f["loss"][:common],
                                                               t["loss"][:common])]
        gap = [max(g, 1e-17) for g in gap]
        axes[2].semilogy(f["step"][:common], gap, color="#55a868", lw=1.0)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("|loss fused - loss torchvision| / loss torchvision")
        axes[2].set_title("same init, same batches", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return report.save_figure(fig, path)


# --- the command ---------------------------------------------------------------------------

def _resolve(args, ckpt_args: Optional[dict], data_name: str) -> None:
    for key, default in _RESUMED.items():
        if getattr(args, key, None) is None:
            value = (ckpt_args or {}).get(key, default)
            setattr(args, key, value)
    if args.epochs is None and args.steps is None:
        args.epochs = _DEFAULT_EPOCHS.get(data_name, 90)


def resolve_arguments(args, ckpt: Optional[dict], device: torch.device) -> None:
    """Fill in what the command line left open: from the checkpoint being resumed, else the
    defaults, some of them the device's (AMP and channels_last on GPU)."""
    data_name = args.data or (ckpt or {}).get("args", {}).get("data") or "digits"
    data_name = data_name if data_name in ("digits", "synthetic") else "imagefolder"
    _resolve(args, (ckpt or {}).get("args"), data_name)
    gpu = device.type == "cuda"
    args.amp = gpu if args.amp is None else args.amp
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    args.torch_dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    if args.lr is None:
        args.lr = 0.1 * args.batch / 256


class TrainJob:
    """One `train` run on this rank: the data, the models (fused, and torchvision's with
    --compare) with their optimizers, the output files; `run()` trains, evaluates,
    checkpoints and reports."""

    def __init__(self, args, rank: int, world: int, device: torch.device,
                 ckpt: Optional[dict] = None):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.is_main = rank == 0
        if args.resume and ckpt is None:
            ckpt = read_checkpoint(args)
        resolve_arguments(args, ckpt, device)
        if args.backend:
            fused_resnet.set_backend(args.backend)
        self.load_data()
        self.build_runs()
        self.start = self.resume(ckpt) if ckpt is not None else 0
        self.name_outputs()

    # -- setting up --

    def load_data(self) -> None:
        args = self.args
        self.data = load_data(args.data, args.image_size, args.seed)
        args.image_size = self.data.image_size
        self.batches = GlobalBatches(len(self.data.train), args.batch, args.seed, self.rank,
                                     self.world)
        self.total = args.steps if args.steps is not None else \
            max(1, int(round(args.epochs * self.batches.steps_per_epoch)))
        self.eval_every = args.eval_every or self.batches.steps_per_epoch

    def build_runs(self) -> None:
        args, total = self.args, self.total
        fused, tv_model = _build(args, self.data.num_classes, self.device, self.world)
        models = [("fused", fused)] + ([("torchvision", tv_model)] if tv_model is not None
                                       else [])
        self.runs = [loop.TrainingRun(
            label, model, args.lr, args.momentum, args.weight_decay,
            lambda s: _lr_factor(s, total, args.schedule, args.warmup), self.device.type,
            _amp_dtype(args)) for label, model in models]

    def resume(self, ckpt: dict) -> int:
        """Load every model's state from the checkpoint; the step it is at."""
        for r in self.runs:
            if r.label not in ckpt["runs"]:
                raise ValueError(f"{self.args.resume} has no {r.label} model to resume "
                                 "(was it trained without --compare?)")
            r.load(ckpt["runs"][r.label])
        return int(ckpt["step"])

    def name_outputs(self) -> None:
        args = self.args
        self.name = args.name or f"train_{self.device.type}_{args.model}_{self.data.name}"
        self.out_dir = Path(args.out)
        self.json_path = self.out_dir / f"{self.name}.json"
        self.png_path = self.out_dir / f"{self.name}.png"
        self.ckpt_path = self.out_dir / f"{self.name}.ckpt.pt"
        self.saved_args = {k: getattr(args, k) for k in _RESUMED}
        self.saved_args["data"] = args.data

    # -- the loop --

    def run(self) -> int:
        self.train()
        if self.start >= self.total:
            self.finish_without_training()
        if self.is_main:
            self.print_summary()
        return 0

    def train(self) -> None:
        """Steps start..total-1; the curves fetched every 10 steps, evaluation, checkpoint
        and results every eval_every steps and at the end."""
        args, total = self.args, self.total
        for r in self.runs:
            r.model.train()
        bar = report.progress(total=total, desc=f"train {args.model}",
                              disable=args.quiet or not self.is_main)
        if self.start:
            bar.update(self.start)
        for step, (x, y) in enumerate(_train_batches(self.data, self.batches, args, self.device,
                                                     self.start, total), start=self.start):
            for r in self.runs:
                r.step(step, x, y, args.batch, self.world)
            done = step + 1
            bar.update(1)
            if done % 10 == 0 or done == total or done % self.eval_every == 0:
                for r in self.runs:
                    r.flush(args.batch, self.world)
                post = " ".join(f"{r.label[:5]} {r.history['loss'][-1]:.4f}" for r in self.runs)
                bar.set_postfix_str(f"loss {post}")
            if done % self.eval_every == 0 or done == total:
                self.evaluate(done)
                acc = " ".join(f"{r.label} {100 * r.history['eval']['acc'][-1]:.2f}%"
                               for r in self.runs)
                if self.is_main and not args.quiet:
                    bar.write(f"step {done}/{total}: val acc {acc}", file=sys.stderr)
                self.save_checkpoint(done)
                self.write_results(final=done == total)
        bar.close()

    def finish_without_training(self) -> None:
        """A checkpoint resumed at or past the last step: evaluate it if it never was, and
        write the final results."""
        report.note(f"the checkpoint is already at step {self.start} of {self.total}: "
                    "nothing to train")
        if not any(r.history["eval"]["step"] for r in self.runs):
            self.evaluate(self.start)
        self.write_results(final=True)

    def evaluate(self, step: int) -> None:
        """Validation loss and accuracy of every model, into its history."""
        for r in self.runs:
            batches = _val_batches(self.data, self.args, self.device, self.rank, self.world)
            loss, correct, n = loop.evaluate(r.model, batches, self.device,
                                             _amp_dtype(self.args), self.world)
            r.history["eval"]["step"].append(step)
            r.history["eval"]["loss"].append(loss / max(n, 1))
            r.history["eval"]["acc"].append(correct / max(n, 1))

    # -- files --

    def save_checkpoint(self, step: int) -> None:
        """NAME.ckpt.pt (rank 0, unless --no-save), replaced atomically; with
        --keep-checkpoints also NAME.step<step>.ckpt.pt."""
        args = self.args
        if not (self.is_main and args.save):
            return
        state = {"state_dict": loop.unwrap(self.runs[0].model).state_dict(),
                 "model": args.model, "num_classes": self.data.num_classes, "step": step,
                 "total_steps": self.total, "args": self.saved_args,
                 "runs": {r.label: r.state() for r in self.runs}}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_path.with_name(self.ckpt_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)
        if args.keep_checkpoints:
            kept = self.out_dir / f"{self.name}.step{step}.ckpt.pt"
            kept.unlink(missing_ok=True)
            try:
                os.link(self.ckpt_path, kept)     # the same file, no second write
            except OSError:
                shutil.copyfile(self.ckpt_path, kept)

    def summary(self) -> dict:
        """The final numbers of each model (and the fused-vs-torchvision loss gap)."""
        summary = {}
        for r in self.runs:
            h = r.history
            summary[r.label] = {
                "final_val_acc": h["eval"]["acc"][-1] if h["eval"]["acc"] else None,
                "final_val_loss": h["eval"]["loss"][-1] if h["eval"]["loss"] else None,
                "final_train_loss": h["loss"][-1] if h["loss"] else None,
                "train_time_s": h["train_time_s"],
                "images_per_s": h["images"] / h["train_time_s"] if h["train_time_s"] else None}
        if len(self.runs) == 2:
            f, t = self.runs[0].history["loss"], self.runs[1].history["loss"]
            gaps = [abs(a - b) / abs(b) for a, b in zip(f, t) if b]
            summary["loss_rel_gap_first10_max"] = max(gaps[:10], default=None)
            summary["loss_rel_gap_max"] = max(gaps, default=None)
        return summary

    def meta(self, final: bool) -> dict:
        """The run's settings, for the JSON file."""
        args, data, batches = self.args, self.data, self.batches
        return {"command": "train", "model": args.model, "data": data.name,
                "train_images": len(data.train), "val_images": len(data.val),
                "num_classes": data.num_classes, "image_size": data.image_size,
                "batch": args.batch, "world_size": self.world,
                "local_batches": batches.local_sizes, "steps": self.total,
                "steps_per_epoch": batches.steps_per_epoch,
                "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
                "schedule": args.schedule, "warmup": args.warmup, "seed": args.seed,
                "dtype": args.dtype, "amp": bool(args.amp),
                "amp_dtype": args.amp_dtype if args.amp else None,
                "channels_last": bool(args.channels_last), "compile": bool(args.compile),
                "fused_backend": fused_resnet.get_backend(),
                "sync_bn": self.world > 1, "finished": final, "argv": sys.argv}

    def plot_title(self, env: dict) -> str:
        args, data, world = self.args, self.data, self.world
        return (f"{args.model} on {data.name} ({len(data.train)} train images, "
                f"{data.image_size}px), batch {args.batch} x {self.total} steps, "
                f"{args.schedule} lr {args.lr:g}, {args.dtype}"
                f"{' + AMP ' + args.amp_dtype if args.amp else ''}, "
                f"{world} rank{'s' if world > 1 else ''}, {env['device_name']}")

    def write_results(self, final: bool) -> None:
        """NAME.json (rank 0); at the end also NAME.png."""
        if not self.is_main:
            return
        hist = {r.label: r.history for r in self.runs}
        summary = self.summary()
        env = report.environment(self.device)
        report.write_json(self.json_path, {"meta": self.meta(final), "environment": env,
                                           "summary": summary, "history": hist})
        if final:
            _plot(self.png_path, hist, self.plot_title(env))

    def print_summary(self) -> None:
        args, world = self.args, self.world
        rows = []
        for r in self.runs:
            h = r.history
            acc = h["eval"]["acc"][-1] if h["eval"]["acc"] else float("nan")
            ips = h["images"] / h["train_time_s"] if h["train_time_s"] else float("nan")
            rows.append(f"  {r.label:<12} val acc {100 * acc:6.2f}%  val loss "
                        f"{h['eval']['loss'][-1] if h['eval']['loss'] else float('nan'):.4f}  "
                        f"train {h['train_time_s']:7.1f} s  {ips:8.1f} img/s")
        print(f"{args.model} on {self.data.name}: {self.total} steps of {args.batch} images, "
              f"{world} rank{'s' if world > 1 else ''} on {self.device.type}")
        print("\n".join(rows))
        print(f"wrote {self.json_path}"
              + (f", {self.png_path}" if self.png_path.exists() else "")
              + (f", {self.ckpt_path}" if args.save else ""))


_CHECKPOINT_KEYS = {"runs", "step", "args", "state_dict"}


def read_checkpoint(args) -> dict:
    """The --resume checkpoint; a usage error (exit 2) when it is missing or is not one
    that train wrote."""
    path = args.resume
    if not os.path.isfile(path):
        usage_error(args, f"--resume {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # pickle, zip and torch errors alike: not a checkpoint
        usage_error(args, f"--resume {path!r} is not a checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})")
    if not (isinstance(ckpt, dict) and _CHECKPOINT_KEYS <= set(ckpt)):
        usage_error(args, f"--resume {path!r} is not a train checkpoint (expected the "
                          f"entries {sorted(_CHECKPOINT_KEYS)}; a plain state_dict goes to "
                          "the zoo: fused_resnet.resnet50(weights=PATH))")
    return ckpt


def check_arguments(args) -> Optional[dict]:
    """What can be wrong before any work starts, each an argparse-style error (exit 2):
    the checkpoint to resume (returned), the data directory, the output directory."""
    if not args.backend:
        try:   # the process default: FUSED_RESNET_BACKEND, read now rather than mid-run
            fused_resnet.get_backend()
        except ValueError as err:
            usage_error(args, str(err))
    ckpt = read_checkpoint(args) if args.resume else None
    data = args.data or ((ckpt or {}).get("args") or {}).get("data")
    if data not in (None, "", "digits", "synthetic"):
        problem = image_folder_problem(data)
        if problem:
            usage_error(args, f"--data {data!r}: {problem}")
    problem = unwritable(args.out)
    if problem:
        usage_error(args, f"--out {args.out!r}: cannot write there: {problem}")
    return ckpt


def run(args: argparse.Namespace) -> int:
    if getattr(args, "compare_plain", False):  # the degradation experiment instead
        return degradation.run_from_train_args(args)
    ckpt = check_arguments(args)
    if args.compare and args.model in CIFAR_MODELS:
        print(f"error: torchvision has no {args.model}: --compare needs an ImageNet model",
              file=sys.stderr)
        return 2

    # -- processes and device --
    want = args.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    rank, world = 0, 1
    device = torch.device(want)
    launched = launch.launched_by_torchrun()
    if launched:
        rank, world, _local, device = launch.init_from_env(device.type)
        if device.type == "cpu" and args.threads is None:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return TrainJob(args, rank, world, device, ckpt).run()
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
