"""``headroom convert`` and ``headroom inspect`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys

# Torch-free modules only (the help of every subcommand must come without importing torch): the library's own
# choices from its constants, the rest imported where a command runs.
from ..kernels.constants import (
    COMFY_ROTATION_GROUPS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_ROTATION_GROUP,
    METHODS,
    ROTATION_GROUPS,
)
from ..quant.formats.builtin import DEFAULT_LAYOUT, SUMMARIES, WRITABLE


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert a bf16/fp16/fp32/fp8 safetensors checkpoint (file or folder) to INT8",
        description="Quantize the Linear weights of a safetensors checkpoint to INT8, one tensor at a time "
                    "(RAM use does not grow with the model). Norms, biases, embeddings and the layers named by "
                    "skip patterns stay as they are.")
    convert.add_argument("src", metavar="IN", help="a .safetensors file or a model folder of shards")
    convert.add_argument("dst", metavar="OUT", nargs="?",
                         help="output file/folder (default: IN with -int8-<method> added)")
    convert.add_argument("--method", choices=METHODS, default="rowwise",
                         help="scale granularity (default rowwise: fastest, ComfyUI-compatible)")
    convert.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="inputs per scale for --method block")
    convert.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                         help="keep layers whose name contains PATTERN in float (repeatable; end with $ to anchor)")
    convert.add_argument("--no-default-skips", action="store_true",
                         help="do not apply the built-in skip patterns (vae, final_layer, embeddings...)")
    convert.add_argument("--device", default="cpu", help="where to quantize: cpu or cuda (default cpu)")
    # no argparse choices: a format registered at run time is a layout too; the converter checks the name
    convert.add_argument("--layout", default=DEFAULT_LAYOUT, metavar="LAYOUT",
                         help=" or ".join(f"{name} ({SUMMARIES[name]})" for name in WRITABLE)
                         + f"; default {DEFAULT_LAYOUT}")
    headroom_only = [g for g in ROTATION_GROUPS if g not in COMFY_ROTATION_GROUPS]
    convert.add_argument("--rotate", nargs="?", type=int, const=DEFAULT_ROTATION_GROUP, default=0, metavar="GROUP",
                         help=f"Hadamard-rotate weights in groups of GROUP inputs before quantizing (ComfyUI's convrot; "
                              f"default group {DEFAULT_ROTATION_GROUP}; {'/'.join(map(str, COMFY_ROTATION_GROUPS))} "
                              f"load in stock ComfyUI, {'/'.join(map(str, headroom_only))} in headroom only): much "
                              f"lower error on layers with outlier channels")
    convert.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                         help="merge this float LoRA (safetensors; kohya, ComfyUI or diffusers/PEFT keys) into the "
                              "weights before quantizing, at STRENGTH (default 1.0); repeatable")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never IN)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.set_defaults(func=run_convert)

    inspect = subparsers.add_parser(
        "inspect", help="describe a safetensors checkpoint: format, method, layers, size, VRAM estimates",
        description="Read only the safetensors headers and say what the checkpoint is and how much VRAM its "
                    "weights take at bf16 / INT8 / NF4.")
    inspect.add_argument("path", metavar="PATH", help="a .safetensors file or a model folder")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=run_inspect)


def _user_error(err: Exception):
    from . import UserError

    return UserError(str(err))


class _Stopped(BaseException):
    """SIGTERM / SIGHUP, raised where the conversion is, so that its cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop_the_conversion():
    """SIGTERM (``kill``, a job scheduler) and SIGHUP (the terminal closed) raise :class:`_Stopped` in the main
    thread: the library removes its temporary output as for any exception. A second signal during that cleanup is
    ignored, so the cleanup finishes."""
    catch = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])

    def stop(signum, frame):
        for sig in catch:
            signal.signal(sig, signal.SIG_IGN)
        raise _Stopped(signum)

    try:
        previous = {sig: signal.signal(sig, stop) for sig in catch}
    except ValueError:  # not the main thread: nothing to install
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bake_options(args: argparse.Namespace) -> dict:
    """--rotate / --lora as convert_path keywords (only when given: plain conversions pass nothing new)."""
    from ..quant.lora_bake import parse_lora_args

    options = {}
    if args.rotate:
        options["rotate"] = args.rotate
    if args.lora:
        options["loras"] = parse_lora_args(args.lora)
    return options


def run_convert(args: argparse.Namespace) -> int:
    from ..quant.atomic import OutputError
    from ..quant.convert import ConvertError, convert_path, default_output
    from ..quant.safetensors_stream import FormatError

    try:
        with _signals_stop_the_conversion():
            dst = args.dst or default_output(args.src, args.method, args.layout)
            report = convert_path(
                args.src, dst, method=args.method, block_size=args.block_size, skip=args.skip,
                keep_default_skips=not args.no_default_skips, device=args.device, layout=args.layout,
                progress=not args.quiet and not args.json, overwrite=args.overwrite, **_bake_options(args))
    except (ConvertError, FormatError, OutputError) as err:
        raise _user_error(err) from None
    except KeyboardInterrupt:
        print("headroom convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        print(f"headroom convert: stopped by {name}; the unfinished output was removed, nothing was written",
              file=sys.stderr)
        return 128 + stopped.signum
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ..quant.inspection import inspect_path

    from ..quant.safetensors_stream import FormatError

    try:
        report = inspect_path(args.path)
    except FormatError as err:
        raise _user_error(err) from None
    print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0
