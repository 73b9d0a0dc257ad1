"""The degradation experiment of the ResNet paper (Fig. 1 / Fig. 6) at small scale: plain
and residual networks of the same depth trained the same way, their training error vs step.

    from fused_resnet.tools.degradation import run_degradation
    result = run_degradation("cifar_resnet56", steps=300, out_dir="benchmarks/results/degradation")

    python -m fused_resnet.tools.degradation --model cifar_resnet56 --steps 300
    (and `python -m fused_resnet train --model cifar_resnet56 --compare-plain`, which calls
    run_degradation)

Data: whatever is available offline - scikit-learn's 8x8 handwritten digits (1797 images,
10 classes), upscaled to 32x32 and repeated to 3 channels, normalised; both networks see the
same batches in the same order from the same initial seed. The residual network uses
option-A shortcuts by default (as the paper's CIFAR experiments), the plain one none
(`shortcut=None`): same layers, same parameter count.

Writes `<out_dir>/degradation_<model>.json` (curves, settings, environment) and
`<out_dir>/degradation_<model>.png` (training error of both networks vs step: the per-batch
error, thin, and its moving average, thick).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import fused_resnet

from . import loop, report
from .arguments import PLAIN_MODELS
from .data import digits_images

__all__ = ["run_degradation", "run_from_train_args", "summary", "main"]

DEFAULT_OUT_DIR = report.DEFAULT_RESULTS_DIR / "degradation"


def _digits_32() -> tuple:
    """All of data.digits_images at 32x32, normalised to mean 0 / std 1 over every image
    (the experiment measures training error: no validation split)."""
    x, y = digits_images(32)
    grey = x[:, :1].contiguous()  # the three channels are the same: one channel's statistics
    return (x - grey.mean()) / grey.std(), y


def _moving_average(values: Sequence[float], window: int) -> list:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _train_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
               steps: int, batch_size: int, lr: float, momentum: float, weight_decay: float,
               warmup: int, desc: str, progress: bool,
               final_eval_images: Optional[int] = None) -> dict:
    """`steps` SGD steps of train's loop (loop.TrainingRun) on the batches `order` lists,
    at lr/10 for the first `warmup` steps (the paper's warm-up of its deepest nets); then
    the training error of the final network in eval mode."""
    run = loop.TrainingRun(desc, model, lr, momentum, weight_decay,
                           lambda step: 0.1 if step < warmup else 1.0, x.device.type)
    model.train()
    t0 = time.perf_counter()
    with report.progress(total=steps, desc=desc, disable=not progress) as bar:
        for step in range(steps):
            idx = order[step]
            run.step(step, x[idx], y[idx], batch_size)
            run.flush(batch_size)  # every step: the bar shows this step's loss and error
            bar.update(1)
            bar.set_postfix_str(f"loss {run.history['loss'][-1]:.3f} "
                                f"err {100.0 * (1.0 - run.history['train_acc'][-1]):.1f}%")
    seconds = time.perf_counter() - t0
    # training error of the final network on the training set (eval mode)
    n = x.shape[0] if final_eval_images is None else min(final_eval_images, x.shape[0])
    _, correct, _ = loop.evaluate(model, ((x[i:min(i + 256, n)], y[i:min(i + 256, n)])
                                          for i in range(0, n, 256)), x.device)
    return {"step": list(range(1, steps + 1)),
            "train_error": [100.0 * (1.0 - acc) for acc in run.history["train_acc"]],
            "loss": [v if math.isfinite(v) else float("nan") for v in run.history["loss"]],
            "final_train_error": 100.0 * (n - correct) / n, "final_eval_images": n,
            "seconds": seconds}


def _plot(path: Path, result: dict, smooth: int) -> Optional[Path]:
    plt = report.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"plain": "#c44e52", "residual": "#4c72b0"}
    for name, curve in result["curves"].items():
        label = f"{curve['label']} ({curve['final_train_error']:.1f}% final)"
        ax.plot(curve["step"], curve["train_error"], color=colors[name], alpha=0.25, lw=0.8)
        ax.plot(curve["step"], _moving_average(curve["train_error"], smooth), color=colors[name],
                lw=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training error (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Plain vs residual, depth {result['depth']}: training error "
                 f"(digits 32x32, batch {result['batch_size']})", fontsize=10)
    fig.tight_layout()
    return report.save_figure(fig, path)


def run_degradation(model_name: str = "cifar_resnet20", steps: int = 300, batch_size: int = 64,
                    lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                    warmup: int = 0, seed: int = 0, out_dir: str | Path = DEFAULT_OUT_DIR,
                    device: str | torch.device = "cpu", backend: Optional[str] = None,
                    residual_shortcut: str = "A", channels_last: bool = False,
                    progress: bool = True, plot: bool = True,
                    final_eval_images: Optional[int] = None,
                    build: Optional[Callable[..., nn.Module]] = None) -> dict:
    """Train the plain (shortcut=None) and the residual (shortcut=residual_shortcut)
    version of `model_name` with identical data order and initial seed for `steps` SGD
    steps on the offline digits data; write JSON curves and a PNG plot to out_dir.

    Returns the result dict (also written as JSON) with "curves": {"plain": ...,
    "residual": ...} (per step: "train_error" in % of the batch, "loss"; and
    "final_train_error": % over the whole training set in eval mode, or its first
    final_eval_images images) and the paths "json" and "png" (None without matplotlib or
    with plot=False).
    `build(shortcut=..., num_classes=10)` overrides the model constructor."""
    if build is None:
        if model_name not in PLAIN_MODELS:
            raise ValueError(f"unknown model {model_name!r} for the degradation experiment; "
                             f"expected one of {sorted(PLAIN_MODELS)}")
        build = getattr(fused_resnet, model_name)
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    device = torch.device(device)
    x, y = _digits_32()
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} images)")
    epochs = -(-steps // per_epoch)
    order = torch.cat([torch.randperm(n, generator=g)[:per_epoch * batch_size]
                       .view(per_epoch, batch_size) for _ in range(epochs)])[:steps]
    order = order.to(device)

    curves = {}
    with fused_resnet.use_backend(backend) if backend else contextlib.nullcontext():
        for name, shortcut in (("plain", None), ("residual", residual_shortcut)):
            torch.manual_seed(seed)
            model = build(shortcut=shortcut, num_classes=10).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            params = sum(p.numel() for p in model.parameters())
            label = f"plain-{_depth(model_name)}" if shortcut is None else \
                f"ResNet-{_depth(model_name)} ({shortcut})"
            curve = _train_one(model, x, y, order, steps, batch_size, lr, momentum,
                               weight_decay, warmup, label, progress, final_eval_images)
            curve.update(label=label, shortcut=shortcut, parameters=params)
            curves[name] = curve

    out_dir = Path(out_dir)
    result = {
        "experiment": "degradation", "model": model_name, "depth": _depth(model_name),
        "dataset": "sklearn digits 8x8 -> 32x32x3 (1797 images)", "steps": steps,
        "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "warmup": warmup, "seed": seed,
        "residual_shortcut": residual_shortcut, "channels_last": channels_last,
        "backend": backend or "auto", "environment": report.environment(device),
        "curves": curves,
    }
    json_path = out_dir / f"degradation_{model_name}.json"
    png_path = _plot(out_dir / f"degradation_{model_name}.png", result,
                     max(1, min(25, steps // 10))) if plot else None
    result["json"], result["png"] = str(json_path), (str(png_path) if png_path else None)
    report.write_json(json_path, result)
    return result


def _depth(model_name: str) -> str:
    digits = "".join(ch for ch in model_name if ch.isdigit())
    return digits or model_name


def summary(result: dict) -> str:
    lines = [f"degradation experiment, {result['model']}, {result['steps']} steps, "
             f"batch {result['batch_size']}:"]
    for curve in result["curves"].values():
        last = curve["train_error"][-max(1, len(curve["train_error"]) // 10):]
        lines.append(f"  {curve['label']:<22} params {curve['parameters']:>10,}  "
                     f"final train error {curve['final_train_error']:5.1f}%  "
                     f"(last-10% batch error {sum(last) / len(last):5.1f}%)  "
                     f"{curve['seconds']:.1f} s")
    lines.append(f"  wrote {result['json']}" + (f" and {result['png']}" if result["png"] else ""))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cifar_resnet20", choices=PLAIN_MODELS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=0,
                        help="steps at lr/10 first (the paper's 110-layer warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--shortcut", default="A", choices=["A", "B", "C"],
                        help="shortcut option of the residual network")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.tools.degradation",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run_degradation(args.model, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, warmup=args.warmup, seed=args.seed,
                             out_dir=args.out_dir, device=args.device, backend=args.backend,
                             residual_shortcut=args.shortcut)
    print(summary(result))
    return 0


def run_from_train_args(args: argparse.Namespace) -> int:
    """`python -m fused_resnet train --compare-plain ...` (train.py): the
    train subcommand's arguments mapped onto run_degradation."""
    if args.data not in (None, "digits"):
        print(f"error: --compare-plain runs on the offline digits data only, got --data "
              f"{args.data}", file=sys.stderr)
        return 2
    model = args.model or "cifar_resnet20"
    if model not in PLAIN_MODELS:
        print(f"error: --compare-plain needs a basic-block model ({', '.join(PLAIN_MODELS)}), "
              f"got {model}", file=sys.stderr)
        return 2
    batch = args.batch or 64
    steps = args.steps
    if steps is None:
        per_epoch = 1797 // batch
        steps = max(1, int(round((args.epochs or 10) * per_epoch)))
    device = args.device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_degradation(model, steps=steps, batch_size=batch,
                             lr=args.lr if args.lr is not None else 0.1,
                             momentum=args.momentum if args.momentum is not None else 0.9,
                             weight_decay=(args.weight_decay if args.weight_decay is not None
                                           else 1e-4),
                             warmup=args.warmup or 0, seed=args.seed or 0,
                             out_dir=args.out if args.out != "runs/train" else DEFAULT_OUT_DIR,
                             device=device, backend=args.backend,
                             channels_last=bool(args.channels_last),
                             progress=not args.quiet)
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
