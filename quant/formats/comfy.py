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
from ..safetensors_stream import FormatError
from .builtin import COMFY, SUMMARIES
from .registry import Int8Format, Int8LayerTensors

COMFY_QUANT_SUFFIX = "comfy_quant"
COMFY_INT8_FORMAT = "int8_tensorwise"


MAX_COMFY_QUANT_BYTES = 64 * 2**10  # ComfyUI's entries are ~100 bytes; a huge one is not a config


def decode_comfy_quant(tensor: torch.Tensor, key: str = COMFY_QUANT_SUFFIX) -> dict:
    """The JSON dict stored in a ``comfy_quant`` uint8 tensor. FormatError naming ``key`` when it is not bytes of a
    JSON object in UTF-8 (another dtype, over 64 KiB, not UTF-8, not JSON, not an object)."""
    def damaged(problem: str) -> FormatError:
        return FormatError(f"'{key}' {problem}: the layer's ComfyUI quantization config is damaged; re-export the file")

    if tensor.dtype not in (torch.uint8, torch.int8):
        raise damaged(f"is a {str(tensor.dtype).replace('torch.', '')} tensor, not bytes (uint8)")
    if tensor.numel() > MAX_COMFY_QUANT_BYTES:
        raise damaged(f"holds {tensor.numel():,} bytes, far more than a config")
    raw = tensor.to("cpu").reshape(-1).view(torch.uint8).numpy().tobytes()
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise damaged("is not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise damaged("is not valid JSON") from None
    if not isinstance(config, dict):
        raise damaged(f"holds a JSON {type(config).__name__}, not an object")
    return config


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
    Our own files may use 32 or 128 too; anything else raises ValueError (never guess a rotation): a group that
    is not a whole number (``"256"``, ``256.5``, ``true``), a ``convrot`` that is not true or false, ``params``
    that is not an object.
    """
    params = comfy_quant.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"'params' {params!r}, which is not an object")
    convrot = comfy_quant.get("convrot", params.get("convrot", False))
    if not isinstance(convrot, bool):
        raise ValueError(f"'convrot' {convrot!r}, which is neither true nor false")
    if not convrot:
        return 0
    group = comfy_quant.get("convrot_groupsize", params.get("convrot_groupsize", DEFAULT_ROTATION_GROUP))
    if isinstance(group, bool) or not isinstance(group, int):
        raise ValueError(f"'convrot_groupsize' {group!r}, which is not a whole number")
    return check_group(group)


def layer_comfy_format(tensors: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    """The ``"format"`` a layer's ``comfy_quant`` names (any dtype: fp8, nvfp4...); None without one."""
    key = prefix + COMFY_QUANT_SUFFIX
    return decode_comfy_quant(tensors[key], key).get("format") if key in tensors else None


class ComfyConfigFormat(Int8Format):
    """A layout whose layers carry ComfyUI's quantization config: a dict with ``"format"``, maybe convrot fields."""

    def layer_config(self, tensors: Mapping[str, torch.Tensor], prefix: str,
                     file_metadata: Mapping[str, str] | None) -> dict:
        raise NotImplementedError

    def rotation_group(self, tensors, prefix, file_metadata=None) -> int:
        """(of an int8 layer: its config must name ComfyUI's INT8 format)"""
        return _rotation_group(_int8_config(self.layer_config(tensors, prefix, file_metadata), prefix + "weight"),
                               prefix + "weight")

    def read(self, tensors, prefix, file_metadata=None) -> Int8LayerTensors | None:
        """Checks the config against the weight's dtype, then reads the layer with its rotation group."""
        config = self.layer_config(tensors, prefix, file_metadata)
        weight_key = prefix + "weight"
        weight = tensors[weight_key]
        if weight.dtype != torch.int8:
            if config.get("format") == COMFY_INT8_FORMAT:
                raise ValueError(f"'{weight_key}' is {weight.dtype} but its ComfyUI config says {COMFY_INT8_FORMAT}")
            return None
        return self.int8_layer(tensors, prefix, file_metadata, _rotation_group(_int8_config(config, weight_key),
                                                                               weight_key))


def _int8_config(config: dict, weight_key: str) -> dict:
    """``config`` of an int8 weight, when it names no format or ComfyUI's INT8 one; else ValueError naming it."""
    fmt = config.get("format")
    if fmt is not None and fmt != COMFY_INT8_FORMAT:
        raise ValueError(f"'{weight_key}' is int8 in ComfyUI format {fmt!r}, which headroom cannot read "
                         f"(supported: {COMFY_INT8_FORMAT})")
    return config


def _rotation_group(config: dict, weight_key: str) -> int:
    try:
        return rotation_group_of(config)
    except ValueError as err:
        raise ValueError(f"'{weight_key}' is Hadamard-rotated (convrot) with {err}; headroom refuses to compute "
                         f"with a rotated weight it cannot un-rotate. Re-export it with convrot_groupsize 16, 64 "
                         f"or 256.") from None


class ComfyFormat(ComfyConfigFormat):
    name = COMFY
    priority = 30  # a per-layer marker: the most specific claim after a header naming its own layout
    summary = SUMMARIES[COMFY]
    marker_suffixes = (COMFY_QUANT_SUFFIX,)
    writable = True
    methods = ("rowwise", "tensorwise")
    rotation_groups = COMFY_ROTATION_GROUPS

    def owns_layer(self, keys: Container[str], prefix: str, file_metadata=None) -> bool:
        return prefix + COMFY_QUANT_SUFFIX in keys

    def layer_config(self, tensors, prefix, file_metadata=None) -> dict:
        return decode_comfy_quant(tensors[prefix + COMFY_QUANT_SUFFIX], prefix + COMFY_QUANT_SUFFIX)

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
