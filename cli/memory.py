"""``headroom gpu-info``: what each GPU has free, the default weight budget and the smart-offload verdict."""

from __future__ import annotations


def gpu_info_lines(width: int, height: int, loader_reserve_gb: float = 0.0) -> list[str]:
    """One line per GPU and its verdict at ``width`` x ``height``; ValueError for a size or reserve out of range
    (checked also on a machine without a GPU). torch is imported here, not with the parser (``--help`` is fast)."""
    import torch

    from ..memory.estimate import GB, estimate_inference_vram_gb, should_offload
    from ..memory.planner import default_budget_bytes

    estimate_inference_vram_gb(width, height, loader_reserve_gb)
    if not torch.cuda.is_available():
        return ["no CUDA GPU visible: budgets, streaming and VRAM tracking are inactive (CPU only)"]
    lines = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        decision = should_offload(width, height, free, total, loader_reserve_gb)
        lines.append(f"cuda:{index} {name}: {free / GB:.1f} of {total / GB:.1f} GB free; default weight budget "
                     f"(55 %) {default_budget_bytes(total) / GB:.1f} GB")
        lines.append(f"  at {width}x{height}: {decision.reason}")
    return lines


def _number(flag: str, text: str, kind):
    from . import UserError

    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a {'whole ' if kind is int else ''}number") from None


def _run(args) -> int:
    from . import UserError

    width, height = _number("--width", args.width, int), _number("--height", args.height, int)
    reserve = _number("--reserve-gb", args.reserve_gb, float)
    try:
        lines = gpu_info_lines(width, height, reserve)
    except ValueError as err:
        raise UserError(str(err).replace("loader_reserve_gb=", "--reserve-gb ")) from None
    for line in lines:
        print(line)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("gpu-info", help="free VRAM, default budget and the smart-offload decision per GPU")
    # Numbers are read as text and checked by _run: a bad one is one line on stderr, like every user error.
    parser.add_argument("--width", default="1024", help="image width in pixels (default 1024)")
    parser.add_argument("--height", default="1024", help="image height in pixels (default 1024)")
    parser.add_argument("--reserve-gb", default="0", help="loader reserve added to the estimate, GB (default 0)")
    parser.set_defaults(func=_run)
