"""Describing a checkpoint from its safetensors headers alone (no tensor data): :func:`detect_format`."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from pathlib import Path

import torch

from ...kernels.int8 import FP8_DTYPES, block_size_of, method_of_scale
from ..safetensors_stream import FormatError, Header, TensorInfo, read_header
from .metadata import META_SKIPPED, check_headroom_metadata, is_headroom_metadata, recorded_block_size, recorded_names
from .registry import layer_format


@dataclass
class FileInfo:
    """What a checkpoint is, read from safetensors headers only (no tensor data)."""

    path: str
    format: str  # "float" | "mixed" | a format's label: "headroom", "comfy", "comfy_legacy", "plain_int8"...
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
    rotation_groups: dict[int, int] = field(default_factory=dict)  # Hadamard group -> INT8 layers stored rotated

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantized_layers)

    @property
    def label(self) -> str:
        """``headroom INT8 (Hadamard-rotated, group 256)``, ``comfy INT8``, ``float``..."""
        if not self.is_quantized:
            return "float"
        if not self.rotation_groups:
            return f"{self.format} INT8"
        groups = ", ".join(map(str, sorted(self.rotation_groups)))
        rotated = sum(self.rotation_groups.values())
        part = "" if rotated == len(self.quantized_layers) else f": {rotated} of {len(self.quantized_layers)} layers"
        return f"{self.format} INT8 (Hadamard-rotated, group{'s' if len(self.rotation_groups) > 1 else ''} {groups}{part})"

    def as_dict(self) -> dict:
        return asdict(self)


def _layer_format_and_scale(header: Header, layer: str, weight: TensorInfo, markers: Mapping) -> tuple[str, str, int | None, int]:
    """(format label, method, block size, rotation group) of the INT8 layer ``layer`` from its header entries and its
    format's small marker tensors (``markers``: a lazy reader of the file). ValueError naming the tensor when the
    layer cannot be read as it is (no scale, a scale that does not fit, a damaged marker)."""
    prefix = layer + "."
    fmt = layer_format(header.tensors, prefix, header.metadata)
    key = fmt.scale_key(header.tensors, prefix)
    if key is None:
        where = " or ".join(f"'{prefix}{suffix}'" for suffix in fmt.scale_suffixes)
        raise ValueError(f"INT8 tensor '{prefix}weight' has no scale ({where}); the file is incomplete or in a layout "
                         f"headroom does not know")
    stored = header.tensors[key]
    # a meta tensor: the format's own reading of the scale, without its data
    scale = fmt.our_scale(torch.empty(stored.shape, dtype=stored.dtype, device="meta"), weight.shape, key)
    group = fmt.rotation_group(markers, prefix, header.metadata)
    method = method_of_scale(scale, weight.shape[0])
    if method != "block":
        return fmt.file_label, method, None, group
    return fmt.file_label, method, block_size_of(weight.shape[1], scale, recorded_block_size(header.metadata)), group


def describe_header(header: Header) -> FileInfo:
    """A :class:`FileInfo` for one parsed header (and the few bytes of its layers' format markers). FormatError naming
    the file and the field or tensor when it is damaged: our header fields, ComfyUI's quantization metadata, a
    scale that does not fit its weight, a marker that is not a config."""
    from ..safetensors_stream import TensorReader

    with TensorReader(header.path, header) as markers:
        try:
            return _describe(header, markers)
        except ValueError as err:  # FormatError too
            raise FormatError(f"{header.path}: {err}") from None


def _describe(header: Header, markers: Mapping) -> FileInfo:
    check_headroom_metadata(header.metadata)
    dtypes: dict[str, dict[str, int]] = {}
    quantized, formats, methods, block_sizes, fp8, float_linear = [], Counter(), Counter(), set(), [], []
    groups: Counter = Counter()
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
            label, method, size, group = _layer_format_and_scale(header, layer, info, markers)
            formats[label] += 1
            methods[method] += 1
            if size:
                block_sizes.add(size)
            if group:
                groups[group] += 1
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
        skipped = recorded_names(header.metadata, META_SKIPPED)
    else:
        skipped = float_linear if quantized else []
    block_size = min(block_sizes) if block_sizes else None
    return FileInfo(
        path=str(header.path), format=fmt, method=method, block_size=block_size, dtypes=dtypes,
        quantized_layers=quantized, skipped_layers=skipped, fp8_layers=fp8,
        total_bytes=header.path.stat().st_size, files=[str(header.path)], parameters=parameters,
        int8_parameters=int8_parameters, metadata=dict(header.metadata), rotation_groups=dict(groups),
    )


def safetensors_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The ``*.safetensors`` files in ``folder``, sorted; ``recursive`` also those in its sub-folders (a diffusers
    model's vae/, text_encoder/...), where a transformers checkpoint's shards all sit at the top."""
    pattern = "**/*.safetensors" if recursive else "*.safetensors"
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file())


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The file ``path``, or every ``*.safetensors`` under the folder ``path`` (FormatError when there is none)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = safetensors_files(path, recursive=True)
    if not files:
        raise FormatError(f"{path} is a folder without any .safetensors file")
    return files


INDEX_SUFFIX = ".safetensors.index.json"  # transformers / diffusers: which shard holds which tensor
MAX_INDEX_BYTES = 256 * 2**20  # a 400 GB model's index is ~10 MB


@dataclass
class ShardIndex:
    """A checked ``*.safetensors.index.json``: its JSON, and a weight_map whose every shard is a ``.safetensors``
    file next to it that holds every tensor the map names there."""

    path: Path
    data: dict
    weight_map: dict[str, str]


def read_index(path: Path, headers: Mapping[Path, Header]) -> ShardIndex:
    """Parse ``path`` and check it against the shards' parsed ``headers`` (every ``.safetensors`` of the folder).

    FormatError naming the index and what is wrong: not JSON, not an object, no weight_map, a shard outside the
    index's folder (``../``, a sub-folder, an absolute path), a shard that is missing, a tensor its shard lacks.
    """
    def bad(problem: str) -> FormatError:
        return FormatError(f"{path}: {problem}; fix or delete the index (it is checked before anything is converted)")

    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise bad(f"is {path.stat().st_size:,} bytes, more than any real index ({MAX_INDEX_BYTES:,})")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
        raise bad("is not valid JSON") from None
    except OSError as err:
        raise FormatError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise bad(f"holds a JSON {type(data).__name__}, not an object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("has no weight_map object naming the shards")
    if not isinstance(data.get("metadata", {}), dict):
        raise bad("has a 'metadata' entry that is not an object")
    folder = path.parent
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise bad(f"maps '{tensor}' to {shard!r}, not a file name")
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or os.path.isabs(shard):
            raise bad(f"maps '{tensor}' to '{shard}', which is not a file next to the index (shards outside the "
                      f"folder are refused)")
        header = headers.get(folder / shard)
        if header is None:
            raise bad(f"maps '{tensor}' to '{shard}', which is not a .safetensors file in {folder}")
        if tensor not in header.tensors:
            raise bad(f"maps '{tensor}' to '{shard}', which does not hold it")
    return ShardIndex(path, data, weight_map)


def model_groups(folder: Path, headers: Mapping[Path, Header]) -> list[list[Path]]:
    """The folder's ``.safetensors`` files (``headers``' keys) as the checkpoints they form, per sub-folder.

    In one sub-folder, the shards an index names are one checkpoint (every index is checked, :func:`read_index`);
    files no index names are one checkpoint when their tensor names do not overlap (shards without an index, or
    one file), else each file is its own - a bf16 model next to its INT8 conversion is two models, not one.
    Sub-folders are a pipeline's components (diffusers: transformer/, vae/...), each its own group. The folder is
    one model when there is one group per sub-folder.
    """
    indexes = [read_index(path, headers) for path in sorted(folder.rglob(f"*{INDEX_SUFFIX}"))]
    groups: list[list[Path]] = []
    for directory in sorted({file.parent for file in headers}):
        files = [file for file in headers if file.parent == directory]
        covered: set[Path] = set()
        for index in (i for i in indexes if i.path.parent == directory):
            shards = sorted({directory / shard for shard in index.weight_map.values()})
            groups.append(shards)
            covered.update(shards)
        rest = [file for file in files if file not in covered]
        names = [name for file in rest for name in headers[file].tensors]
        if rest and not covered and len(names) == len(set(names)):
            groups.append(rest)
        else:
            groups += [[file] for file in rest]
    return groups


def separate_models_note(groups: list[list[Path]], folder: Path) -> str | None:
    """None when ``groups`` (:func:`model_groups`) are one model; else a line saying the folder holds several."""
    if len(groups) == len({group[0].parent for group in groups}):
        return None
    return (f"{folder} holds {len(groups)} separate checkpoints, not the shards of one model (files whose tensor "
            f"names overlap, or that no index ties together)")


def detect_format(path: str | os.PathLike) -> FileInfo:
    """Describe a safetensors file (or a folder of shards) from its headers only. FormatError for a folder that
    holds separate checkpoints (``headroom inspect`` reports those one by one)."""
    path = Path(path)
    headers = {f: read_header(f) for f in checkpoint_files(path)}
    if not path.is_dir():
        return describe_header(headers[path])
    note = separate_models_note(model_groups(path, headers), path)
    if note:
        raise FormatError(f"{note}; describe them one by one (`headroom inspect {path}` does)")
    return merge_infos(path, [describe_header(h) for h in headers.values()])


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
        rotation_groups=dict(sum((Counter(i.rotation_groups) for i in infos), Counter())),
    )
