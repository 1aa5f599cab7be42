"""Command line: ``headroom convert|inspect|demo|gpu-info|kernels`` (also ``python -m comfyui_headroom``).

The CLI is a face over the library: one module per subcommand here, each with a ``register(subparsers)``
function that adds its parser and sets ``func``. The library never imports this package; it raises its own
errors (``ConvertError``, ``FormatError``, ``ValueError`` ...), which the subcommands turn into
:class:`UserError` - one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands (relative to this package), in the order --help lists them.
SUBCOMMAND_MODULES = (".convert", ".demo", ".memory", ".kernels")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headroom", description="INT8 / NF4 diffusion models under a VRAM budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name, __package__).register(sub)
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
