"""Helpers shared by the command-line tools (bench, check, train, ...): environment
information, JSON files, text tables, PNG bar charts and progress bars.

matplotlib and tqdm are optional: without matplotlib the plot is skipped with a note,
without tqdm a plain progress line is printed instead.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

import fused_resnet

DEFAULT_RESULTS_DIR = Path("benchmarks") / "results"

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --- environment ----------------------------------------------------------------------------

def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001  (absent or broken: no version to report)
        return None
    return getattr(mod, "__version__", "unknown")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name(device: Optional[torch.device] = None) -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001
        return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def environment(device: str | torch.device = "cpu") -> dict:
    """{device, device_name, torch, triton, torchvision, python, cpu, gpu, date, ...}:
    what every result file records."""
    device = torch.device(device)
    gpu = gpu_name(device if device.type == "cuda" else None)
    try:
        backends = fused_resnet.available_backends()
    except Exception:  # noqa: BLE001  (a broken build: the record says so by a null)
        backends = None
    version = getattr(fused_resnet, "__version__", None)
    env = {
        "device": device.type,
        "device_name": gpu if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                 "matmul": torch.backends.cuda.matmul.allow_tf32},
        "fused_resnet": version,
        "fused_resnet_backends": backends,
        "hostname": platform.node(),
        "date": now_iso(),
    }
    return env


def command_line() -> str:
    """The command that is running, for the record."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0] = "python -m fused_resnet"
    return " ".join(argv)


# --- files ----------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return DTYPE_NAMES.get(obj, str(obj))
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _clean(obj: Any) -> Any:
    """NaN / inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (parent directories created, file replaced atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(obj), f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- tables ---------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                 align: Optional[str] = None) -> str:
    """A plain-text table; `align` is one 'l' or 'r' per column (default: first left)."""
    rows = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    headers = list(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if align[i] == "l" else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(out)


# --- plots ----------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not
    there: plots are optional."""
    try:  # imported here: matplotlib is an optional dependency
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001  (not installed, or broken)
        print(f"note: matplotlib is not available ({err}); skipping the plot", file=sys.stderr)
        return None
    return plt


def bar_chart(path: str | os.PathLike, groups: Sequence[dict], title: str,
              ylabel: str = "images / s", footnote: Optional[str] = None) -> Optional[Path]:
    """Write a PNG with one panel per group; a group is
    {"title": str, "labels": [...], "values": [... or None], "notes": [str per bar]}.
    Bars whose value is None are drawn as 'n/a'. Returns the path, or None when
    matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    n = max(len(groups), 1)
    width = max(3.2, 0.9 * max((len(g["labels"]) for g in groups), default=1) + 1.5)
    fig_width = max(7.0, width * n)
    fig, axes = plt.subplots(1, n, figsize=(fig_width, 5.2), squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
              "#8c8c8c", "#ccb974", "#64b5cd"]
    for ax, group in zip(axes[0], groups):
        labels = list(group["labels"])
        values = [v if v is not None else 0.0 for v in group["values"]]
        notes = list(group.get("notes") or [""] * len(labels))
        x = range(len(labels))
        bars = ax.bar(x, values, color=[colors[i % len(colors)] for i in x])
        top = max(values, default=0.0) or 1.0
        for bar, value, note in zip(bars, group["values"], notes):
            text = "n/a" if value is None else f"{fmt(float(value))}"
            if note:
                text += f"\n{note}"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, text,
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=9)
        ax.set_ylim(0, top * 1.25)
        ax.set_ylabel(ylabel)
        ax.set_title(group.get("title", ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    chars = int(fig_width * 11)
    title = "\n".join(textwrap.wrap(title, chars)) or title
    fig.suptitle(title, fontsize=11)
    if footnote:
        footnote = "\n".join(textwrap.wrap(footnote, int(fig_width * 16)))
        fig.text(0.01, 0.01, footnote, fontsize=7, ha="left", va="bottom", alpha=0.8)
    top = 1 - 0.05 * (title.count("\n") + 1)
    bottom = 0.03 * (footnote.count("\n") + 1) + 0.01 if footnote else 0
    fig.tight_layout(rect=(0, bottom, 1, top))
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a figure made with `pyplot()` as a PNG (parent directories created) and
    close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# --- progress -------------------------------------------------------------------------------

class _PlainProgress:
    """What tqdm does, reduced to a line on stderr every ~10% (or every 5 s)."""

    def __init__(self, total: Optional[int], desc: str = "", disable: bool = False):
        self.total, self.desc, self.disable, self.n = total, desc, disable, 0
        self._last_t = time.monotonic()
        self._last_frac = -1.0
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        frac = self.n / self.total if self.total else 0.0
        now = time.monotonic()
        if frac - self._last_frac >= 0.1 or now - self._last_t >= 5 or frac >= 1:
            self._last_frac, self._last_t = frac, now
            total = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{total} {self._postfix}".rstrip(), file=sys.stderr,
                  flush=True)

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self._postfix = s

    def write(self, s: str, file=None) -> None:
        print(s, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: Optional[int] = None, desc: str = "", disable: bool = False,
             leave: bool = True):
    """A progress bar on stderr: tqdm when installed, a plain fallback otherwise.
    Use as a context manager; call .update(n), .set_description(s), .set_postfix_str(s)."""
    try:  # imported here: tqdm is an optional dependency
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, leave=leave, file=sys.stderr,
                dynamic_ncols=True)


def emit(bar, text: str) -> None:
    """Print `text` to stdout without breaking a progress bar that is being drawn."""
    write = getattr(bar, "write", None)
    if write is None:
        print(text, flush=True)
    else:
        write(text, file=sys.stdout)
        sys.stdout.flush()


def note(message: str) -> None:
    """A message to the user (stderr, so that stdout stays the report)."""
    print(f"note: {message}", file=sys.stderr, flush=True)
