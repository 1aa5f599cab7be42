"""``headroom gpu-info``: what each GPU has free, the default weight budget and the smart-offload verdict."""

from __future__ import annotations

import torch

from ..memory.estimate import GB, should_offload
from ..memory.planner import default_budget_bytes


def gpu_info_lines(width: int, height: int, loader_reserve_gb: float = 0.0) -> list[str]:
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


def _run(args) -> int:
    for line in gpu_info_lines(args.width, args.height, args.reserve_gb):
        print(line)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("gpu-info", help="free VRAM, default budget and the smart-offload decision per GPU")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--reserve-gb", type=float, default=0.0, help="loader reserve added to the estimate")
    parser.set_defaults(func=_run)
