"""``headroom doctor [MODEL]``: what this machine can run - see :mod:`comfyui_headroom.memory.doctor`."""

from __future__ import annotations

import argparse
import json


def _size(flag: str, text: str | None, unit: int, name: str):
    """A size in ``name`` (GB, MB) as text -> bytes (None: the default); UserError unless from 0 to 1,000,000."""
    from . import UserError

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a number ({name})") from None
    if not 0 <= value <= 1_000_000:
        raise UserError(f"{flag} {text}: expected {name} from 0 to 1,000,000")
    return int(value * unit)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor", help="GPUs, RAM, disk speed, and where a model's blocks would live (GPU / RAM / disk)",
        description="Reports the GPUs, free VRAM, RAM and the read speed of the model's disk; for a model file or "
                    "folder, the plan under the default and the given budgets: blocks on the GPU, in RAM and on "
                    "disk, the step-time bound, and whether it fits at all.")
    parser.add_argument("model", nargs="?", default=None, help="a .safetensors file or a folder of them")
    parser.add_argument("--gpu-budget-gb", default=None, help="VRAM for weights (default 55 %% of cuda:0)")
    parser.add_argument("--ram-budget-gb", default=None,
                        help="RAM for streamed blocks; the rest is read from disk (default: what the machine can spare)")
    parser.add_argument("--read-test-mb", default="256", help="bytes read for the disk speed test (default 256 MB)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..memory.doctor import DoctorError, diagnose, format_report
    from . import UserError

    gpu = _size("--gpu-budget-gb", args.gpu_budget_gb, 2**30, "GB")
    ram = _size("--ram-budget-gb", args.ram_budget_gb, 2**30, "GB")
    read_bytes = _size("--read-test-mb", args.read_test_mb, 2**20, "MB")
    if read_bytes < 2**20:
        raise UserError(f"--read-test-mb {args.read_test_mb}: the disk test needs at least 1 MB")
    try:
        report = diagnose(args.model, gpu, ram, read_test_bytes=read_bytes)
    except DoctorError as err:
        raise UserError(str(err)) from None
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0
