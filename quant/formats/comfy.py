"""``comfy``: ComfyUI's per-layer layout, read always and written on request (stock ComfyUI loads it).

Per layer ``<p>``: ``<p>weight`` int8 ``[out, in]``, ``<p>weight_scale`` float32 (``[]`` tensorwise or ``[out, 1]``
per output row: ComfyUI multiplies the weight by the scale as stored) and ``<p>comfy_quant``, a uint8 tensor
holding JSON such as ``{"format": "int8_tensorwise"}``. The Hadamard-rotated "convrot" variant adds
``"convrot": true, "convrot_groupsize": g`` (readers also accept both fields nested under ``"params"``): the
weight then holds ``Q(W H)`` (the math: kernels/rotation.py).
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping

import torch

from ...kernels.int8 import DEFAULT_BLOCK_SIZE
from ...kernels.rotation import COMFY_ROTATION_GROUPS, DEFAULT_ROTATION_GROUP, check_group
from .registry import Int8Format, Int8LayerTensors

COMFY_QUANT_SUFFIX = "comfy_quant"
COMFY_INT8_FORMAT = "int8_tensorwise"


def decode_comfy_quant(tensor: torch.Tensor) -> dict:
    """The JSON dict stored in a ``comfy_quant`` uint8 tensor."""
    return json.loads(bytes(tensor.to("cpu", torch.uint8).reshape(-1).tolist()).decode("utf-8"))


def encode_comfy_quant(config: Mapping) -> torch.Tensor:
    """A ``comfy_quant`` tensor: the JSON bytes of ``config`` as uint8."""
    return torch.tensor(list(json.dumps(dict(config)).encode("utf-8")), dtype=torch.uint8)


def comfy_quant_config(group: int, comfy: bool = True) -> dict:
    """The ``comfy_quant`` entry ComfyUI writes for a rotated per-channel INT8 layer.

    ``comfy=False`` also allows our extra group sizes (32, 128) for files only headroom reads.
    """
    check_group(group, comfy=comfy)
    return {"format": COMFY_INT8_FORMAT, "convrot": True, "convrot_groupsize": group}


def int8_config(rotation_group: int = 0, comfy: bool = True) -> dict:
    """The ``comfy_quant`` entry of an INT8 layer we write: plain, or convrot when ``rotation_group`` > 0."""
    return comfy_quant_config(rotation_group, comfy) if rotation_group else {"format": COMFY_INT8_FORMAT}


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


def layer_comfy_format(tensors: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    """The ``"format"`` a layer's ``comfy_quant`` names (any dtype: fp8, nvfp4...); None without one."""
    key = prefix + COMFY_QUANT_SUFFIX
    return decode_comfy_quant(tensors[key]).get("format") if key in tensors else None


class ComfyConfigFormat(Int8Format):
    """A layout whose layers carry ComfyUI's quantization config: a dict with ``"format"``, maybe convrot fields."""

    def layer_config(self, tensors: Mapping[str, torch.Tensor], prefix: str,
                     file_metadata: Mapping[str, str] | None) -> dict:
        raise NotImplementedError

    def read(self, tensors, prefix, file_metadata=None) -> Int8LayerTensors | None:
        """Checks the config against the weight's dtype, then reads the layer with its rotation group."""
        config = self.layer_config(tensors, prefix, file_metadata)
        weight_key = prefix + "weight"
        weight = tensors[weight_key]
        fmt = config.get("format")
        if weight.dtype != torch.int8:
            if fmt == COMFY_INT8_FORMAT:
                raise ValueError(f"'{weight_key}' is {weight.dtype} but its ComfyUI config says {fmt}")
            return None
        if fmt is not None and fmt != COMFY_INT8_FORMAT:
            raise ValueError(f"'{weight_key}' is int8 in ComfyUI format '{fmt}', which headroom cannot read "
                             f"(supported: {COMFY_INT8_FORMAT})")
        return self.int8_layer(tensors, prefix, file_metadata, _rotation_group(config, weight_key))


def _rotation_group(config: dict, weight_key: str) -> int:
    try:
        return rotation_group_of(config)
    except ValueError as err:
        raise ValueError(f"'{weight_key}' is Hadamard-rotated (convrot) with {err}; headroom refuses to compute "
                         f"with a rotated weight it cannot un-rotate. Re-export it with convrot_groupsize 16, 64 "
                         f"or 256.") from None


class ComfyFormat(ComfyConfigFormat):
    name = "comfy"
    priority = 30  # a per-layer marker: the most specific claim
    summary = "ComfyUI's int8_tensorwise, loads in stock ComfyUI; rowwise or tensorwise, no block"
    marker_suffixes = (COMFY_QUANT_SUFFIX,)
    writable = True
    methods = ("rowwise", "tensorwise")
    rotation_groups = COMFY_ROTATION_GROUPS

    def owns_layer(self, keys: Container[str], prefix: str, file_metadata=None) -> bool:
        return prefix + COMFY_QUANT_SUFFIX in keys

    def layer_config(self, tensors, prefix, file_metadata=None) -> dict:
        return decode_comfy_quant(tensors[prefix + COMFY_QUANT_SUFFIX])

    def check_write(self, method: str, rotation_group: int = 0) -> None:
        if method == "block":
            raise ValueError("ComfyUI's int8_tensorwise layout has one scale per tensor or per output row: it cannot "
                             "express block scales. Use --method rowwise (or tensorwise) with --layout comfy, or "
                             "--layout headroom for block")
        if rotation_group:
            try:
                check_group(rotation_group, comfy=True)
            except ValueError as err:
                raise ValueError(f"--rotate {rotation_group}: {err}") from None
            if method != "rowwise":
                raise ValueError("ComfyUI's rotated (convrot) INT8 is per output channel only: use --method rowwise "
                                 "with --layout comfy --rotate, or --layout headroom")
        super().check_write(method, rotation_group)

    def scale_shape(self, method: str, out_features: int, in_features: int, block_size: int) -> tuple[int, ...]:
        if method == "rowwise":  # ComfyUI multiplies the int8 weight by the scale as stored
            return (out_features, 1)
        return super().scale_shape(method, out_features, in_features, block_size)

    def layer_tensors(self, prefix, weight, scale, method, block_size=DEFAULT_BLOCK_SIZE, rotation_group=0):
        tensors = super().layer_tensors(prefix, weight, scale, method, block_size, rotation_group)
        tensors[prefix + COMFY_QUANT_SUFFIX] = encode_comfy_quant(int8_config(rotation_group))
        return tensors
