"""INT8 checkpoint formats on disk: recognise every layout we read, describe a file from its header.

Layouts of one quantized Linear ``<p>`` (``<p>`` is a prefix ending with a dot, e.g. ``blocks.0.attn.qkv.``):

* ``headroom``     - ours: ``<p>weight`` int8 ``[out, in]`` + ``<p>weight_scale`` float32 (``[]`` tensorwise,
  ``[out]`` rowwise, ``[out, nblocks]`` block); the header metadata (``headroom.*`` keys) names the method,
  block size, quantized and skipped layers, the source file's hash and the tool version.
* ``comfy``        - ComfyUI's per-layer layout: ``<p>comfy_quant`` (uint8 tensor holding JSON such as
  ``{"format": "int8_tensorwise"}``, maybe ``"convrot": true``) + ``<p>weight_scale`` (``[]`` or ``[out, 1]``).
* ``comfy_legacy`` - older ComfyUI files: header metadata ``_quantization_metadata`` = JSON
  ``{"layers": {"<layer>": {"format": "int8_tensorwise"}}}`` + ``<p>weight_scale``.
* ``plain``        - no description at all, an int8 weight next to ``<p>weight_scale`` or ``<p>scale_weight``
  (scalar, ``[out]`` or ``[out, 1]``): lightx2v int8-vllm, OneTrainer / convert_to_quant exports.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from ..kernels.int8 import DEFAULT_BLOCK_SIZE, FP8_DTYPES, block_size_of, method_of_scale, normalise_scale
from .safetensors_stream import FormatError, Header, TensorInfo, read_header

# Our header metadata keys (safetensors metadata maps str -> str; lists travel as JSON strings).
META_FORMAT_VERSION = "headroom.format_version"
META_METHOD = "headroom.method"
META_BLOCK_SIZE = "headroom.block_size"
META_LAYOUT = "headroom.layout"
META_QUANTIZED = "headroom.quantized_layers"
META_SKIPPED = "headroom.skipped_layers"
META_SKIP_REASONS = "headroom.skip_reasons"
META_SOURCE_FILE = "headroom.source_file"
META_SOURCE_HASH = "headroom.source_sha256_of_header_and_size"
META_TOOL_VERSION = "headroom.tool_version"
FORMAT_VERSION = "1"

COMFY_QUANT_SUFFIX = "comfy_quant"
COMFY_LEGACY_KEY = "_quantization_metadata"
COMFY_INT8_FORMAT = "int8_tensorwise"
SCALE_SUFFIXES = ("weight_scale", "scale_weight")  # ours/ComfyUI/lightx2v, OneTrainer/old ComfyUI fp8
INPUT_SCALE_SUFFIXES = ("input_scale", "scale_input")  # static activation scales: we quantize activations ourselves


@dataclass
class Int8LayerTensors:
    """One INT8 layer as read from a file, with the scale normalised to our layout."""

    weight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32: [] tensorwise, [out] rowwise, [out, nblocks] block
    block_size: int
    source_format: str  # "headroom" | "comfy" | "comfy_legacy" | "plain"
    convrot: bool  # ComfyUI's Hadamard-rotated variant: the weight lives in a rotated basis
    consumed_keys: list[str]  # every key used (weight, scale, comfy_quant, input scales)

    @property
    def method(self) -> str:
        return method_of_scale(self.scale, self.weight.shape[0])


def decode_comfy_quant(tensor: torch.Tensor) -> dict:
    """The JSON dict stored in a ``comfy_quant`` uint8 tensor."""
    return json.loads(bytes(tensor.to("cpu", torch.uint8).reshape(-1).tolist()).decode("utf-8"))


def encode_comfy_quant(config: Mapping) -> torch.Tensor:
    """A ``comfy_quant`` tensor: the JSON bytes of ``config`` as uint8."""
    return torch.tensor(list(json.dumps(dict(config)).encode("utf-8")), dtype=torch.uint8)


def comfy_legacy_layers(file_metadata: Mapping[str, str] | None) -> Mapping[str, dict]:
    """``{layer: config}`` (read-only) from an old ComfyUI header's ``_quantization_metadata`` (empty when absent)."""
    raw = (file_metadata or {}).get(COMFY_LEGACY_KEY)
    return _parse_legacy(raw) if raw else MappingProxyType({})


@functools.lru_cache(maxsize=8)
def _parse_legacy(raw: str) -> Mapping[str, dict]:
    # Cached (hence read-only): a loader asks once per layer, and the JSON names every layer of the model.
    try:
        layers = json.loads(raw).get("layers", {})
    except (ValueError, AttributeError):
        raise FormatError(f"header metadata '{COMFY_LEGACY_KEY}' is not valid JSON") from None
    return MappingProxyType(layers if isinstance(layers, dict) else {})


def is_headroom_metadata(file_metadata: Mapping[str, str] | None) -> bool:
    return bool(file_metadata) and META_FORMAT_VERSION in file_metadata


def _find_scale_key(tensors: Mapping, prefix: str) -> str | None:
    for suffix in SCALE_SUFFIXES:
        if prefix + suffix in tensors:
            return prefix + suffix
    return None


def parse_int8_layer(
    tensors: Mapping[str, torch.Tensor], prefix: str, file_metadata: dict | None = None
) -> Int8LayerTensors | None:
    """Read the INT8 layer at ``prefix`` (trailing dot) in any layout we know; None when its weight is not int8.

    ``tensors`` may be a state dict or a lazy mapping (:class:`~.safetensors_stream.TensorReader`);
    ``file_metadata`` is the safetensors header metadata (needed for ComfyUI's legacy header layout and
    for our block size). Raises ValueError when an INT8 weight has no usable scale.
    """
    weight_key = prefix + "weight"
    if weight_key not in tensors:
        return None
    weight = tensors[weight_key]
    quant_key = prefix + COMFY_QUANT_SUFFIX
    layer_name = prefix[:-1] if prefix.endswith(".") else prefix
    config: dict = {}
    if quant_key in tensors:
        config = decode_comfy_quant(tensors[quant_key])
        source = "comfy"
    elif layer_name in (legacy := comfy_legacy_layers(file_metadata)):
        config = legacy[layer_name]
        source = "comfy_legacy"
    elif is_headroom_metadata(file_metadata):
        source = "headroom"
    else:
        source = "plain"
    fmt = config.get("format")
    if weight.dtype != torch.int8:
        if fmt == COMFY_INT8_FORMAT:
            raise ValueError(f"'{weight_key}' is {weight.dtype} but its ComfyUI config says {fmt}")
        return None
    if fmt is not None and fmt != COMFY_INT8_FORMAT:
        raise ValueError(f"'{weight_key}' is int8 in ComfyUI format '{fmt}', which headroom cannot read "
                         f"(supported: {COMFY_INT8_FORMAT})")
    if weight.ndim != 2:
        raise ValueError(f"INT8 tensor '{weight_key}' has shape {tuple(weight.shape)}; expected [out, in]")
    scale_key = _find_scale_key(tensors, prefix)
    if scale_key is None:
        raise ValueError(f"INT8 tensor '{weight_key}' has no scale ('{prefix}weight_scale' or "
                         f"'{prefix}scale_weight'); the file is incomplete or in a layout headroom does not know")
    scale = normalise_scale(tensors[scale_key], tuple(weight.shape), scale_key)
    default_block = int((file_metadata or {}).get(META_BLOCK_SIZE, DEFAULT_BLOCK_SIZE))
    block_size = block_size_of(weight.shape[1], scale, default_block) if scale.ndim == 2 else default_block
    params = config.get("params") if isinstance(config.get("params"), dict) else {}
    convrot = bool(config.get("convrot", params.get("convrot", False)))
    consumed = [weight_key, scale_key]
    consumed += [prefix + s for s in INPUT_SCALE_SUFFIXES if prefix + s in tensors]
    if quant_key in tensors:
        consumed.append(quant_key)
    return Int8LayerTensors(weight, scale, block_size, source, convrot, consumed)


# ---------------------------------------------------------------------------------------------------------
# Describing a file from its header alone
# ---------------------------------------------------------------------------------------------------------

@dataclass
class FileInfo:
    """What a checkpoint is, read from safetensors headers only (no tensor data)."""

    path: str
    format: str  # "float" | "headroom" | "comfy" | "comfy_legacy" | "plain_int8" | "mixed"
    method: str | None  # "rowwise" | "block" | "tensorwise" | "mixed" | None (nothing quantized)
    block_size: int | None
    dtypes: dict[str, dict[str, int]]  # dtype -> {"tensors", "parameters", "bytes"}
    quantized_layers: list[str]
    skipped_layers: list[str]  # our metadata's list, else float 2-D ``.weight`` layers next to INT8 ones
    fp8_layers: list[str]
    total_bytes: int  # size on disk
    files: list[str] = field(default_factory=list)
    parameters: int = 0
    int8_parameters: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantized_layers)

    def as_dict(self) -> dict:
        return asdict(self)


def _layer_format(header: Header, layer: str, legacy: dict) -> str:
    if f"{layer}.{COMFY_QUANT_SUFFIX}" in header.tensors:
        return "comfy"
    if layer in legacy:
        return "comfy_legacy"
    if is_headroom_metadata(header.metadata):
        return "headroom"
    return "plain_int8"


def _scale_method(header: Header, layer: str, weight: TensorInfo) -> tuple[str | None, int | None]:
    for suffix in SCALE_SUFFIXES:
        info = header.tensors.get(f"{layer}.{suffix}")
        if info is None:
            continue
        out_features, in_features = weight.shape
        if info.numel == 1 and out_features != 1:
            return "tensorwise", None
        if len(info.shape) == 1 or (len(info.shape) == 2 and info.shape[1] == 1):
            return "rowwise", None
        if len(info.shape) == 2:
            default = int(header.metadata.get(META_BLOCK_SIZE, DEFAULT_BLOCK_SIZE))
            blocks = info.shape[1]
            size = default if -(-in_features // default) == blocks else -(-in_features // blocks)
            return "block", size
    return None, None


def describe_header(header: Header) -> FileInfo:
    """A :class:`FileInfo` for one parsed header."""
    legacy = comfy_legacy_layers(header.metadata)
    dtypes: dict[str, dict[str, int]] = {}
    quantized, formats, methods, block_sizes, fp8, float_linear = [], Counter(), Counter(), set(), [], []
    parameters = int8_parameters = 0
    for name, info in header.tensors.items():
        key = str(info.dtype).replace("torch.", "")
        entry = dtypes.setdefault(key, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += info.numel
        entry["bytes"] += info.nbytes
        parameters += info.numel
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        layer = name[: -len(".weight")]
        if info.dtype == torch.int8:
            quantized.append(layer)
            int8_parameters += info.numel
            formats[_layer_format(header, layer, legacy)] += 1
            method, size = _scale_method(header, layer, info)
            methods[method or "unknown"] += 1
            if size:
                block_sizes.add(size)
        elif info.dtype in FP8_DTYPES:
            fp8.append(layer)
        elif info.dtype.is_floating_point:
            float_linear.append(layer)
    if not quantized:
        fmt = "float"
    else:
        fmt = next(iter(formats)) if len(formats) == 1 else "mixed"
    method = (next(iter(methods)) if len(methods) == 1 else "mixed") if methods else None
    if is_headroom_metadata(header.metadata) and META_SKIPPED in header.metadata:
        skipped = list(json.loads(header.metadata[META_SKIPPED]))
    else:
        skipped = float_linear if quantized else []
    block_size = min(block_sizes) if block_sizes else None
    return FileInfo(
        path=str(header.path), format=fmt, method=method, block_size=block_size, dtypes=dtypes,
        quantized_layers=quantized, skipped_layers=skipped, fp8_layers=fp8,
        total_bytes=header.path.stat().st_size, files=[str(header.path)], parameters=parameters,
        int8_parameters=int8_parameters, metadata=dict(header.metadata),
    )


def safetensors_files(folder: Path) -> list[Path]:
    """Every ``*.safetensors`` under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())


def detect_format(path: str | os.PathLike) -> FileInfo:
    """Describe a safetensors file (or a folder of shards) from its headers only."""
    path = Path(path)
    if path.is_dir():
        files = safetensors_files(path)
        if not files:
            raise FormatError(f"{path} is a folder without any .safetensors file")
        return merge_infos(path, [describe_header(read_header(f)) for f in files])
    return describe_header(read_header(path))


def merge_infos(folder: Path, infos: list[FileInfo]) -> FileInfo:
    """One :class:`FileInfo` for a folder of shards (layer names stay unique per shard)."""
    dtypes: dict[str, dict[str, int]] = {}
    for info in infos:
        for key, entry in info.dtypes.items():
            agg = dtypes.setdefault(key, {"tensors": 0, "parameters": 0, "bytes": 0})
            for k, v in entry.items():
                agg[k] += v
    formats = {i.format for i in infos if i.format != "float"}
    methods = {i.method for i in infos if i.method}
    sizes = [i.block_size for i in infos if i.block_size]
    total_on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return FileInfo(
        path=str(folder),
        format="float" if not formats else (formats.pop() if len(formats) == 1 else "mixed"),
        method=None if not methods else (methods.pop() if len(methods) == 1 else "mixed"),
        block_size=min(sizes) if sizes else None,
        dtypes=dtypes,
        quantized_layers=[q for i in infos for q in i.quantized_layers],
        skipped_layers=[s for i in infos for s in i.skipped_layers],
        fp8_layers=[s for i in infos for s in i.fp8_layers],
        total_bytes=total_on_disk,
        files=[f for i in infos for f in i.files],
        parameters=sum(i.parameters for i in infos),
        int8_parameters=sum(i.int8_parameters for i in infos),
        metadata=infos[0].metadata if len(infos) == 1 else {},
    )
