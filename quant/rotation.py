"""Hadamard-rotated INT8 layers on disk, in ComfyUI's "convrot" convention (the math: kernels/rotation.py).

On disk (ComfyUI layout, per layer): ``weight`` int8 ``[out, in]`` holding ``Q(W H)``, ``weight_scale``
float32 ``[out, 1]`` and ``comfy_quant`` = JSON ``{"format": "int8_tensorwise", "convrot": true,
"convrot_groupsize": g}`` (readers also accept the two fields nested under ``"params"``).
"""

from __future__ import annotations

import json

import torch

from ..kernels.rotation import DEFAULT_ROTATION_GROUP, check_group, quantize_rotated

# --- ComfyUI's per-layer ``comfy_quant`` JSON -------------------------------------------------------

def comfy_quant_config(group: int, comfy: bool = True) -> dict:
    """The ``comfy_quant`` entry ComfyUI writes for a rotated per-channel INT8 layer.

    ``comfy=False`` also allows our extra group sizes (32, 128) for files only headroom reads.
    """
    check_group(group, comfy=comfy)
    return {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}


def rotation_group_of(comfy_quant: dict) -> int:
    """Rotation group of a parsed ``comfy_quant`` entry: 0 when the layer is not rotated.

    ComfyUI reads ``convrot`` / ``convrot_groupsize`` at the top level or under ``params`` (default 256).
    Our own files may use 32 or 128 too; anything else raises ValueError (never guess a rotation).
    """
    params = comfy_quant.get("params")
    params = params if isinstance(params, dict) else {}
    if not comfy_quant.get("convrot", params.get("convrot", False)):
        return 0
    group = int(comfy_quant.get("convrot_groupsize", params.get("convrot_groupsize", DEFAULT_ROTATION_GROUP)))
    return check_group(group)


def comfy_rotated_layer(prefix: str, weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Quantize one float ``[out, in]`` weight into ComfyUI's convrot tensors for layer ``prefix`` (ending in '.').

    ``{prefix+"weight": int8 Q(W H), prefix+"weight_scale": float32 [out, 1], prefix+"comfy_quant": JSON}``
    """
    config = comfy_quant_config(group)
    q, scale = quantize_rotated(weight, group, "rowwise")
    blob = torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)
    return {prefix + "weight": q, prefix + "weight_scale": scale.reshape(-1, 1), prefix + "comfy_quant": blob}
