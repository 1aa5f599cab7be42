"""Command line: ``headroom convert|inspect|demo|doctor|gpu-info|kernels`` (also ``python -m comfyui_headroom``).

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

# Each subcommand and the module that registers it (relative to this package), in the order --help lists them.
# `headroom convert ...` builds the parser of that one module only: another subcommand's imports never delay it.
SUBCOMMANDS = {"convert": ".convert", "inspect": ".convert", "demo": ".demo", "doctor": ".doctor", "gpu-info": ".memory",
               "kernels": ".kernels"}
SUBCOMMAND_MODULES = tuple(dict.fromkeys(SUBCOMMANDS.values()))


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def one_line(text: str) -> str:
    """``text`` with control characters escaped: a file's tensor or field name (``"a\\nb"``, a terminal escape)
    quoted in an error can neither break the one-line rule nor drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line on stderr (exit 2) like every other user error,
    pointing at ``--help`` instead of printing the usage block first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(modules: tuple[str, ...] = SUBCOMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser with the subcommands of ``modules`` (default: all). Building it imports nothing heavy from
    convert, inspect and demo (their modules import torch only when a command runs)."""
    parser = _Parser(prog="headroom", description="INT8 / NF4 diffusion models under a VRAM budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name, __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser((SUBCOMMANDS[argv[0]],) if argv and argv[0] in SUBCOMMANDS else SUBCOMMAND_MODULES)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"headroom {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
