"""The dequantize-then-matmul reference: correct everywhere (CPU, any GPU), never the fastest."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8 import dequantize_weight


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` computed in ``x``'s dtype (float32 for half dtypes on CPU)."""
    compute = x.dtype
    if x.device.type == "cpu" and compute in (torch.float16,):
        compute = torch.float32  # fp16 matmul on CPU is slow or missing
    w = dequantize_weight(weight, weight_scale, dtype=compute, block_size=block_size)
    b = bias.to(compute) if bias is not None else None
    return F.linear(x.to(compute), w, b).to(x.dtype)
