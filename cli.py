"""Command line: ``headroom convert|inspect|demo|bench`` (also ``python -m comfyui_headroom``)."""

from __future__ import annotations

import argparse
import logging
import sys


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _COMMANDS.clear()
    for register in _REGISTRARS:
        register(sub)
    return parser


_REGISTRARS: list = []
_COMMANDS: dict = {}


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
