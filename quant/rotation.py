"""Hadamard-rotated INT8 layers on disk, in ComfyUI's "convrot" convention (the math: kernels/rotation.py).

How a rotated layer is stored and recognised is the formats' business: the ``comfy_quant`` entry and its
rotation group live in :mod:`.formats.comfy` (re-exported here), and each writable format lays out a rotated
layer itself. Readers get the group from :attr:`.formats.Int8LayerTensors.rotation_group`.
"""

from __future__ import annotations

import torch

from ..kernels.rotation import check_group, quantize_rotated
from .formats import comfy_quant_config, get_format, rotation_group_of

__all__ = ["comfy_quant_config", "comfy_rotated_layer", "rotation_group_of"]


def comfy_rotated_layer(prefix: str, weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Quantize one float ``[out, in]`` weight into ComfyUI's convrot tensors for layer ``prefix`` (ending in '.').

    ``{prefix+"weight": int8 Q(W H), prefix+"weight_scale": float32 [out, 1], prefix+"comfy_quant": JSON}``
    """
    q, scale = quantize_rotated(weight, check_group(group, comfy=True), "rowwise")
    return get_format("comfy").layer_tensors(prefix, q, scale, "rowwise", rotation_group=group)
