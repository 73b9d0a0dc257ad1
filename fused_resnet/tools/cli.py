"""The command line: `python -m fused_resnet <subcommand> ...`.

Each subcommand is a module of this package that exposes
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int          (the exit code)
and whose docstring's first line is its one-line help. `bench` and `check` are always
there; the optional ones are listed in OPTIONAL and appear when their module exists.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

REQUIRED = ("bench", "check")
OPTIONAL = ("train", "evaluate", "export", "profile")


def _load(name: str, optional: bool):
    module_name = f"{__package__ or 'fused_resnet'}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # A missing optional subcommand module only means no such subcommand; a module
        # that exists but fails to import (a missing dependency inside it) is a real error.
        if optional and err.name == module_name:
            return None
        raise


def subcommands() -> dict:
    """{name: module} of the subcommands available in this installation."""
    found = {}
    for name in REQUIRED + OPTIONAL:
        module = _load(name, optional=name in OPTIONAL)
        if module is not None and hasattr(module, "add_arguments") and hasattr(module, "run"):
            found[name] = module
    return found


def _help(module) -> str:
    doc = (module.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="python -m fused_resnet",
        description="fused_resnet: fused conv + BN + ReLU + shortcut ResNets. Benchmark, "
                    "check against torchvision, train.")
    parser.add_argument("--version", action="version", version=f"fused_resnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in subcommands().items():
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=_help(module), description=doc or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args._run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
