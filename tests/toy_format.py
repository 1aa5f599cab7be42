"""A toy INT8 format in one file: what adding a format to headroom takes (tests/test_format_registry.py).

``toy``: per layer ``<p>weight`` int8 ``[out, in]`` (as every format) and ``<p>toy_scale_t``, the block scales
stored TRANSPOSED as ``[nblocks, out]`` float32 - a scale key and a layout no built-in format knows. It can
store block scales only and no rotated weights; headroom reads and writes it once it is registered:

    register(ToyFormat())
"""

from __future__ import annotations

import math

import torch
from comfyui_headroom.quant.formats import Int8Format

TOY_SCALE = "toy_scale_t"


class ToyFormat(Int8Format):
    name = "toy"
    priority = 25  # a per-layer marker (its scale key): before the header-wide headroom claim and the plain fallback
    summary = "test-only: block scales stored transposed"
    scale_suffixes = (TOY_SCALE,)
    writable = True
    methods = ("block",)

    def owns_layer(self, keys, prefix, file_metadata=None) -> bool:
        return prefix + TOY_SCALE in keys

    def our_scale(self, stored, weight_shape, key):
        if stored.ndim != 2:
            raise ValueError(f"toy scale '{key}' has shape {tuple(stored.shape)}; expected [nblocks, out]")
        return super().our_scale(stored.t(), weight_shape, key)

    def scale_shape(self, method, out_features, in_features, block_size):
        return (math.ceil(in_features / block_size), out_features)

    def layer_tensors(self, prefix, weight, scale, method, block_size=128, rotation_group=0):
        return {prefix + "weight": weight, prefix + TOY_SCALE: scale.t().contiguous()}


def toy_layer(weight: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, transposed block scale) of a float weight, written by hand the way the toy layout stores it."""
    from comfyui_headroom.kernels.int8 import quantize_weight

    q, scale = quantize_weight(weight, "block", block_size)
    return q, scale.t().contiguous()
