"""Choose the INT8 kernel for one call and count what ran.

Until the Triton kernels land, every call goes to the dequantize reference.
"""

from __future__ import annotations

import collections
import threading

import torch

from .reference import reference_linear

_stats: collections.Counter = collections.Counter()
_stats_lock = threading.Lock()


def _record(kernel: str, m: int, n: int, k: int) -> None:
    with _stats_lock:
        _stats[(kernel, m, n, k)] += 1


def kernel_summary() -> dict:
    """``{kernel: {"calls": n, "shapes": {"MxNxK": calls}}}`` since the last reset."""
    summary: dict = {}
    with _stats_lock:
        for (kernel, m, n, k), calls in sorted(_stats.items()):
            entry = summary.setdefault(kernel, {"calls": 0, "shapes": {}})
            entry["calls"] += calls
            entry["shapes"][f"{m}x{n}x{k}"] = calls
    return summary


def reset_kernel_stats() -> None:
    with _stats_lock:
        _stats.clear()


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for an int8 ``W [N, K]`` with its float32 scale; output in ``x.dtype``."""
    n, k = weight.shape
    m = x.numel() // max(k, 1)
    _record("reference", m, n, k)
    return reference_linear(x, weight, weight_scale, bias, block_size)
