"""Command line: ``headroom convert|inspect|demo|...`` (also ``python -m comfyui_headroom``).

Each subcommand lives next to the code it drives, in a module with a ``register(subparsers)`` function
that adds its parser and sets ``func``; this file only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands (relative to this package). A module that does not exist yet is
# skipped; any other import error is raised.
SUBCOMMAND_MODULES = (
    ".quant.cli_convert",
    ".demo.cli_demo",
    ".memory.cli_memory",
    ".kernels.cli_kernels",
)


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headroom", description="INT8 / NF4 diffusion models under a VRAM budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        full = __package__ + name if __package__ else name.lstrip(".")
        try:
            module = importlib.import_module(name, __package__)
        except ModuleNotFoundError as err:
            if err.name and full.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"headroom {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
