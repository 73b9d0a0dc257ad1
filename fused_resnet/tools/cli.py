"""The command line: `python -m fused_resnet <subcommand> ...`.

Each subcommand is a module of this package, listed in SUBCOMMANDS, that exposes
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int          (the exit code)
and whose docstring's first line is its one-line help.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import __version__
from . import bench, check, train

SUBCOMMANDS = {"bench": bench, "check": check, "train": train}


def _help(module) -> str:
    doc = (module.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_resnet",
        description="fused_resnet: fused conv + BN + ReLU + shortcut ResNets. Benchmark, "
                    "check against torchvision, train.")
    parser.add_argument("--version", action="version", version=f"fused_resnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module in SUBCOMMANDS.items():
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
