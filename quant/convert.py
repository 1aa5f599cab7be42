"""The streaming converter: a bf16/fp16/fp32/fp8 safetensors checkpoint (file or folder of shards) -> INT8.

One tensor at a time: read it memory-mapped (:class:`~.safetensors_stream.TensorReader`), quantize it in
chunks of rows (rowwise and block scales are per row, so chunking gives bit-identical results), stream the
bytes into a file whose header was computed up front (:class:`~.safetensors_stream.StreamingWriter`).
Peak memory is a few chunks plus bookkeeping, whatever the model size.

Which tensors are Linear weights is decided from the state dict alone: a 2-D floating ``<layer>.weight``
whose layer name passes the skip rules (:func:`.skip.decide`: patterns, then in/out >= 1024) and does not
look like an embedding table (:func:`looks_like_embedding`: embeddings are 2-D too). Everything else -
norms, biases, 1-D/3-D/4-D tensors, embeddings, skipped layers - is copied as is. fp8 weights (with
``weight_scale`` / ``scale_weight``) are dequantized first; their scale, input scale and ``comfy_quant``
keys are dropped.

Everything is checked before anything is written: options, paths, the input's headers (and a folder's index
files), the plan of every tensor, the free space. The output goes to a temporary name next to OUT, is verified by
reopening it, then renamed (:mod:`.atomic`): an interrupted conversion leaves neither OUT nor a temporary file
behind, and the input is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..kernels.dispatch import check_device
from ..kernels.int8 import DEFAULT_BLOCK_SIZE, FP8_DTYPES, METHODS
from ..units import format_gib
from .atomic import output_error, remove_stale, write_atomically
from .chunked import (
    CHUNK_ELEMENTS,
    WeightError,
    check_finite,
    float_rows,
    fp8_scale_shapes,
    quantize_streamed,
    rows_per_chunk,
)
from .formats import (
    FP8_MARKER_KEY,
    INDEX_SUFFIX,
    Int8Format,
    ShardIndex,
    checkpoint_files,
    conversion_metadata,
    describe_header,
    find_scale_key,
    get_format,
    layout_names,
    quantization_keys,
    read_index,
    registered_formats,
)
from .safetensors_stream import (
    PICKLE_SUFFIXES,
    FormatError,
    Header,
    StreamingWriter,
    TensorInfo,
    TensorReader,
    raw_header_sha256,
    read_header,
    verify_file,
)
from .skip import DEFAULT_MIN_FEATURES, decide, resolve_patterns

KEPT_FP8_DTYPE = torch.bfloat16  # an fp8 layer that stays in float is dequantized to this

# Parts of a layer name that mark an embedding / positional table (embeddings are 2-D like Linear weights).
# Matched against each dot-separated component, split on "_": e.g. "pos_embed", "tok_embeddings",
# "embed_tokens", "wte", "wpe", "time_embedding" all match; "proj_out", "post_attention" do not.
EMBEDDING_WORDS = frozenset({"emb", "embed", "embeds", "embedder", "embedding", "embeddings", "embedder",
                             "wte", "wpe", "tok", "pos", "position", "positional"})


class ConvertError(ValueError):
    """Conversion refused (bad options, existing output, NaN in the input...): the message says what to do."""


def looks_like_embedding(layer: str) -> bool:
    """True when a component of the dotted layer name contains an embedding-like word (see EMBEDDING_WORDS)."""
    return any(word in EMBEDDING_WORDS for part in layer.split(".") for word in re.split(r"[_\-]", part.lower()))


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ConvertReport:
    """What a conversion did; ``str()`` is the closing report the CLI prints."""

    src: str
    dst: str
    layout: str
    method: str
    block_size: int
    quantized: dict[str, float] = field(default_factory=dict)  # layer -> relative error of its weight
    kept: dict[str, str] = field(default_factory=dict)  # 2-D float weight left in float -> reason
    copied_tensors: int = 0
    dropped_keys: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    files: int = 0
    rotation_group: int = 0  # --rotate: Hadamard group size (0 = none)
    rotated: list[str] = field(default_factory=list)  # layers stored rotated
    loras: list[dict] = field(default_factory=list)  # --lora: per LoRA, layers touched (lora_bake summary)
    skipped_files: list[str] = field(default_factory=list)  # pickle weights in a folder: not copied
    stale_removed: list[str] = field(default_factory=list)  # what killed earlier runs into OUT had left (atomic.py)

    @property
    def reduction_pct(self) -> float:
        return 100.0 * (1 - self.bytes_after / self.bytes_before) if self.bytes_before else 0.0

    @property
    def worst_layer(self) -> str | None:
        return max(self.quantized, key=self.quantized.get) if self.quantized else None

    @property
    def worst_error(self) -> float | None:
        return self.quantized[self.worst_layer] if self.quantized else None

    def merge(self, other: "ConvertReport") -> None:
        self.quantized.update(other.quantized)
        self.kept.update(other.kept)
        self.copied_tensors += other.copied_tensors
        self.dropped_keys += other.dropped_keys
        self.files += other.files
        self.rotated += other.rotated

    def as_dict(self) -> dict:
        return {
            "src": self.src, "dst": self.dst, "layout": self.layout, "method": self.method,
            "block_size": self.block_size, "files": self.files,
            "layers_quantized": len(self.quantized), "layers_kept": len(self.kept),
            "copied_tensors": self.copied_tensors, "dropped_keys": list(self.dropped_keys),
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "reduction_pct": round(self.reduction_pct, 2), "worst_relative_error": self.worst_error,
            "worst_layer": self.worst_layer, "seconds": round(self.seconds, 2),
            "quantized": dict(self.quantized), "kept": dict(self.kept),
            "rotation_group": self.rotation_group, "layers_rotated": len(self.rotated), "loras": list(self.loras),
            "skipped_files": list(self.skipped_files), "stale_removed": list(self.stale_removed),
        }

    def __str__(self) -> str:
        method = f"{self.method} (block {self.block_size})" if self.method == "block" else self.method
        lines = [
            f"converted {self.src} -> {self.dst}",
            f"  layout {self.layout}, method {method}, {self.files} file(s), {self.seconds:.1f} s",
            f"  layers: {len(self.quantized)} quantized to INT8, {len(self.kept)} kept in float; "
            f"{self.copied_tensors} other tensors copied",
            f"  size: {format_gib(self.bytes_before)} -> {format_gib(self.bytes_after)} ({self.reduction_pct:.1f} % smaller)",
        ]
        if self.quantized:
            lines.append(f"  worst relative error: {self.worst_error:.4%} in {self.worst_layer}")
        if self.rotation_group:
            plain = len(self.quantized) - len(self.rotated)
            lines.append(f"  rotation: {len(self.rotated)} layers Hadamard-rotated (group {self.rotation_group})"
                         + (f", {plain} plain (input width not a multiple of {self.rotation_group})" if plain else ""))
        for lora in self.loras:
            lines.append(f"  LoRA {Path(lora['lora']).name} x{lora['strength']:g}: {lora['layers_touched']} layers merged"
                         + (f", {lora['unmatched_modules']} modules matched nothing" if lora["unmatched_modules"] else ""))
        reasons: dict[str, int] = {}
        for reason in self.kept.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]:
            lines.append(f"  kept {count} x {reason}")
        if self.skipped_files:
            lines.append(f"  not copied (pickle weights, refused for safety): {', '.join(self.skipped_files[:4])}")
        lines += [f"  cleaned up: {note}" for note in self.stale_removed]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Planning: what each source tensor becomes
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    """One source tensor and what to do with it."""

    key: str
    action: str  # "copy" | "quantize" | "dequantize" (fp8 kept in float)
    outputs: list[str]  # what it writes: the tensor itself, or a quantized layer's tensors in its format
    fp8_scale_key: str | None = None
    rotation: int = 0  # > 0: quantize W H (block Hadamard of this size, see rotation.py)


@dataclass
class _Plan:
    jobs: list[_Job]
    tensors: dict[str, TensorInfo]  # output name -> dtype/shape, in write order
    dropped: list[str]
    kept: dict[str, str]


def layout_format(layout: str) -> Int8Format:
    """The registered format that writes ``layout``; ConvertError listing the choices otherwise."""
    if layout not in layout_names():
        raise ConvertError(f"unknown layout '{layout}'; choose one of {', '.join(layout_names())}")
    return get_format(layout)


def plan_conversion(
    infos: Header | Mapping[str, TensorInfo],
    method: str,
    block_size: int,
    patterns: Sequence[str],
    layout: str,
    name_prefix: str = "",
    min_features: int = DEFAULT_MIN_FEATURES,
    rotate: int = 0,
) -> _Plan:
    """Decide per tensor (from dtypes and shapes only) whether it is quantized, copied, dequantized or dropped.

    ``infos`` is a parsed :class:`Header` or any ``{name: TensorInfo}`` mapping, in write order.

    ``name_prefix`` is prepended to layer names for the skip decision only (a shard in ``vae/`` is judged
    as ``vae.<layer>``, so the ``vae`` pattern keeps a diffusers VAE folder in float).
    """
    tensors_in: Mapping[str, TensorInfo] = infos.tensors if isinstance(infos, Header) else infos
    fmt = layout_format(layout)
    fp8_layers = {k[: -len(".weight")] for k, i in tensors_in.items() if k.endswith(".weight") and i.dtype in FP8_DTYPES}
    dropped = [FP8_MARKER_KEY] if FP8_MARKER_KEY in tensors_in else []
    for layer in fp8_layers:
        dropped += quantization_keys(tensors_in, layer + ".")
    dropped_set = set(dropped)
    jobs, tensors, kept = [], {}, {}
    for key, info in tensors_in.items():
        if key in dropped_set:
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        is_fp8 = info.dtype in FP8_DTYPES
        if layer is not None and len(info.shape) == 2 and (info.dtype.is_floating_point or is_fp8):
            out_features, in_features = info.shape
            if looks_like_embedding(name_prefix + layer):
                reason = "embedding-like name"
            else:
                decision = decide(name_prefix + layer, in_features, out_features, patterns, method, block_size, min_features)
                reason = decision.reason if decision.skip else None
            if reason is None:
                rotation = rotate if rotate and in_features % rotate == 0 else 0
                outputs = fmt.layer_infos(f"{layer}.", info.shape, method, block_size, rotation)
                tensors.update(outputs)
                jobs.append(_Job(key, "quantize", list(outputs),
                                 find_scale_key(tensors_in, f"{layer}.") if is_fp8 else None, rotation))
                continue
            kept[layer] = reason
        if is_fp8 and layer in fp8_layers:
            tensors[key] = TensorInfo(KEPT_FP8_DTYPE, info.shape)
            jobs.append(_Job(key, "dequantize", [key], find_scale_key(tensors_in, f"{layer}.")))
        else:
            tensors[key] = info
            jobs.append(_Job(key, "copy", [key]))
    return _Plan(jobs, tensors, dropped, kept)


# ---------------------------------------------------------------------------------------------------------
# Quantizing one weight in chunks of rows
# ---------------------------------------------------------------------------------------------------------

def _dequantized(weight: torch.Tensor, fp8_scale: torch.Tensor | None, name: str) -> torch.Tensor:
    """An fp8 weight kept in float: KEPT_FP8_DTYPE, computed a chunk of rows at a time."""
    out = torch.empty(weight.shape, dtype=KEPT_FP8_DTYPE)
    step = rows_per_chunk(weight.shape[1], CHUNK_ELEMENTS)
    for start in range(0, weight.shape[0], step):
        rows = float_rows(weight, start, start + step, fp8_scale, "cpu", name)
        check_finite(rows, name)
        out[start:start + step] = rows.to(KEPT_FP8_DTYPE)
    return out


def _check_finite_copy(tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_floating_point() or tensor.dtype in FP8_DTYPES:
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        check_finite(flat[start:start + CHUNK_ELEMENTS], name)


# ---------------------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------------------

def _output_metadata(source: "_SourceInfo", plan: _Plan, method: str, block_size: int, layout: str, rotate: int,
                     lora) -> dict[str, str]:
    """Ours (formats/metadata.py) on top of the source's metadata, less what any format reads from a header: that
    described the input, not the output."""
    kept = {k: v for k, v in source.metadata.items() if not any(f.owns_header_key(k) for f in registered_formats())}
    quantized = [j.key[: -len(".weight")] for j in plan.jobs if j.action == "quantize"]
    return conversion_metadata(kept, method=method, block_size=block_size, layout=layout, quantized=quantized,
                               kept=plan.kept, source_file=source.name, source_hash=source.sha256,
                               rotation_group=rotate, loras=[f.spec.label for f in lora.files] if lora else ())


def refuse_quantized_input(header: Header) -> None:
    """ConvertError when the file already holds INT8 weights (converting twice would only lose precision)."""
    info = describe_header(header)
    if info.is_quantized:
        raise ConvertError(f"{header.path} is already quantized ({info.format} INT8, {info.method}, "
                           f"{len(info.quantized_layers)} layers); nothing to convert - see `headroom inspect {header.path}`")
    for key, tensor in header.tensors.items():  # packed 4-bit / other ComfyUI formats: weight stored as uint8
        prefix = key[: -len("weight")]
        packed = key.endswith(".weight") and not tensor.dtype.is_floating_point and tensor.dtype not in FP8_DTYPES
        if packed and quantization_keys(header.tensors, prefix):
            raise ConvertError(f"{header.path} is already quantized ('{key}' is {str(tensor.dtype).replace('torch.', '')} "
                               f"with a scale: a packed 4-bit or other format headroom cannot re-quantize); convert "
                               f"from the bf16/fp16 original - see `headroom inspect {header.path}`")


@dataclass
class _SourceInfo:
    """What the converter needs to know about its input besides the tensors."""

    name: str  # recorded in the output's metadata (file name, or a model's name)
    label: str  # shown in the report (the path)
    infos: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    sha256: str | None  # of the source file's header + size; None for an in-memory model


def _file_source(header: Header) -> _SourceInfo:
    return _SourceInfo(header.path.name, str(header.path), header.tensors, header.metadata,
                       raw_header_sha256(header.path))


def _write(source: _SourceInfo, reader: Mapping[str, torch.Tensor], dst: Path, plan: _Plan, method: str,
           block_size: int, layout: str, device: str, progress_bar, fail_after: int | None = None, rotate: int = 0,
           lora=None) -> ConvertReport:
    """Convert ``reader``'s tensors into ``dst`` as ``plan`` says (written in place: the caller provides a
    temporary path).

    ``rotate``: Hadamard group for rotated INT8 (rotation.py); ``lora``: a bound :class:`.lora_bake.LoraMerger`,
    merged into each weight chunk by chunk before it is quantized.
    """
    fmt = layout_format(layout)
    metadata = _output_metadata(source, plan, method, block_size, layout, rotate, lora)
    report = ConvertReport(source.label, str(dst), layout, method, block_size, kept=dict(plan.kept),
                           dropped_keys=list(plan.dropped), files=1)
    writer = StreamingWriter(dst, plan.tensors, metadata)
    try:
        for index, job in enumerate(plan.jobs):
            if fail_after is not None and index >= fail_after:
                raise RuntimeError(f"injected failure after {fail_after} tensors (test hook)")
            tensor = reader[job.key]
            fp8_scale = reader[job.fp8_scale_key] if job.fp8_scale_key else None
            merging = lora is not None and lora.targets(job.key)
            if job.action == "quantize":
                hook = (lambda rows, start, key=job.key: lora.merge_rows(key, rows, start)) if merging else None
                q, scale, error = quantize_streamed(tensor, method, block_size, job.key, fp8_scale, device,
                                                    rotation=job.rotation, rows_hook=hook,
                                                    chunk_elements=CHUNK_ELEMENTS)
                layer = job.key[: -len(".weight")]
                report.quantized[layer] = error
                if job.rotation:
                    report.rotated.append(layer)
                for name, out in fmt.layer_tensors(f"{layer}.", q, scale, method, block_size, job.rotation).items():
                    writer.write(name, out)
                del q, out
            elif job.action == "dequantize":
                kept = _dequantized(tensor, fp8_scale, job.key)
                writer.write(job.key, lora.merge_full(job.key, kept) if merging else kept)
            else:
                if merging:
                    tensor = lora.merge_full(job.key, tensor)
                _check_finite_copy(tensor, job.key)
                writer.write(job.key, tensor)
                report.copied_tensors += 1
            del tensor, fp8_scale
            if progress_bar is not None:
                progress_bar.update(source.infos[job.key].nbytes)
        writer.close()
    except WeightError as err:  # NaN/inf or a misfit fp8 scale in the input: one line for the user
        writer.abort()
        raise ConvertError(str(err)) from None
    except BaseException:
        writer.abort()
        raise
    verify_file(dst, plan.tensors, metadata)
    return report


def _write_file(header: Header, dst: Path, plan: _Plan, method: str, block_size: int, layout: str, device: str,
                progress_bar, fail_after: int | None = None, rotate: int = 0, lora=None) -> ConvertReport:
    """Convert one parsed safetensors file into ``dst`` as ``plan`` says, reading it tensor by tensor."""
    with TensorReader(header.path, header) as reader:
        return _write(_file_source(header), reader, dst, plan, method, block_size, layout, device, progress_bar,
                      fail_after, rotate=rotate, lora=lora)


def _planned_bytes(plan: _Plan) -> int:
    return sum(info.nbytes for info in plan.tensors.values())


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------

def _check_options(method: str, block_size: int, layout: str, device: str, rotate: int = 0) -> None:
    if method not in METHODS:
        raise ConvertError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if block_size < 1:
        raise ConvertError(f"block size must be a positive integer, got {block_size}")
    try:
        layout_format(layout).check_write(method, rotate)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    try:
        check_device(device)
    except ValueError as err:  # npu:0, meta, cuda:7 on a smaller machine, cuda without one
        raise ConvertError(f"--device {device!r}: {err}") from None


def _bound_lora_merger(loras, headers):
    """A :class:`.lora_bake.LoraMerger` matched against every tensor of ``headers`` (None without LoRAs).

    Raises ConvertError (before anything is written) when a LoRA matches no layer or its shapes do not fit.
    """
    if not loras:
        return None
    from .lora_bake import LoraError, LoraMerger

    try:
        merger = LoraMerger(loras)
        merger.bind({k: i.shape for h in headers for k, i in h.tensors.items()})
    except LoraError as err:
        raise ConvertError(str(err)) from None
    return merger


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    try:
        _check_path_pair(src, dst, overwrite)
    except OSError as err:  # a name too long, a loop of links... (exists() and resolve() let some through)
        raise output_error(err, dst, "use") from None


def _check_replaceable(dst: Path) -> None:
    if os.path.lexists(dst) and not (dst.is_file() or dst.is_dir()):  # a device, a FIFO, a socket, a broken link
        raise ConvertError(f"OUT {dst} exists and is not a regular file or folder; headroom replaces neither devices "
                           f"nor links to nothing - choose another OUT")


def _check_path_pair(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise FormatError(f"{src} does not exist")
    if src.resolve() == dst.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise ConvertError(f"OUT {dst} is the input itself; headroom never overwrites its input - choose another OUT")
    if src.is_dir() and dst.resolve().is_relative_to(src.resolve()):
        raise ConvertError(f"OUT {dst} lies inside the input folder {src}; choose a folder outside it")
    if src.resolve().is_relative_to(dst.resolve()):  # replacing OUT would delete the input with it
        raise ConvertError(f"OUT {dst} contains the input {src}; choose an OUT that does not")
    _check_replaceable(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.exists() and dst.is_dir() != src.is_dir():
        kind = "a folder" if dst.is_dir() else "a file"
        raise ConvertError(f"{dst} exists and is {kind}; the output of converting {src} cannot replace it")


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def _check_plan(header: Header, plan: _Plan) -> None:
    """ConvertError naming the tensor when an fp8 weight's stored scale cannot be its scale (checked from the header,
    before anything is written): one value or one per output row, never broadcast along the inputs."""
    for job in plan.jobs:
        if job.fp8_scale_key is None:
            continue
        shape = header.tensors[job.fp8_scale_key].shape
        out_features = header.tensors[job.key].shape[0]
        if shape not in fp8_scale_shapes(out_features):
            raise ConvertError(f"{header.path}: fp8 scale '{job.fp8_scale_key}' has shape {list(shape)}, which does "
                               f"not fit the weight '{job.key}' {list(header.tensors[job.key].shape)} (expected one "
                               f"value, [{out_features}] or [{out_features}, 1]); the file is damaged or in a layout "
                               f"headroom does not read - re-export it")


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    method: str = "rowwise",
    block_size: int = DEFAULT_BLOCK_SIZE,
    skip: Sequence[str] | str | None = None,
    keep_default_skips: bool = True,
    device: str = "cpu",
    layout: str = "headroom",
    progress: bool = True,
    overwrite: bool = False,
    _fail_after: int | None = None,
    rotate: int = 0,
    loras: Sequence = (),
) -> ConvertReport:
    """Convert one safetensors file to INT8 (see module docstring). ``_fail_after`` is a test hook.

    ``rotate``: Hadamard group size for rotated INT8 (rotation.py); ``loras``: LoRA files (``FILE[:STRENGTH]``
    or :class:`.lora_bake.LoraSpec`) merged into the float weights before quantizing (lora_bake.py).
    """
    src, dst = Path(src), Path(dst)
    _check_options(method, block_size, layout, device, rotate)
    stale = remove_stale(dst)
    _check_paths(src, dst, overwrite)
    header = read_header(src)
    refuse_quantized_input(header)
    merger = _bound_lora_merger(loras, [header])
    start = time.perf_counter()
    patterns = resolve_patterns(skip, keep_default_skips)
    plan = plan_conversion(header, method, block_size, patterns, layout, rotate=rotate)
    _check_plan(header, plan)
    bar = _progress(header.data_bytes, progress, src.name)
    try:
        report = write_atomically(dst, lambda tmp: _write_file(
            header, tmp, plan, method, block_size, layout, device, bar, fail_after=_fail_after, rotate=rotate,
            lora=merger), _planned_bytes(plan))
    finally:
        if bar is not None:
            bar.close()
    report.dst = str(dst)
    report.stale_removed = stale
    report.rotation_group = rotate
    report.loras = merger.summary() if merger else []
    report.bytes_before = src.stat().st_size
    report.bytes_after = dst.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def convert_source(
    source: Mapping[str, torch.Tensor],
    dst: str | os.PathLike,
    method: str = "rowwise",
    block_size: int = DEFAULT_BLOCK_SIZE,
    skip: Sequence[str] | str | None = None,
    keep_default_skips: bool = True,
    device: str = "cpu",
    layout: str = "headroom",
    progress: bool = False,
    overwrite: bool = True,
    rotate: int = 0,
) -> ConvertReport:
    """Convert tensors that are not a file - e.g. a loaded model, one weight computed at a time - to INT8.

    ``source`` maps names to tensors and has ``.infos`` (``{name: TensorInfo}`` for every tensor, in write
    order: the header is laid out from it before any tensor is asked for); optional ``.name`` and
    ``.metadata`` are recorded in the output. Each tensor is requested once, in ``infos`` order.
    """
    dst = Path(dst)
    _check_options(method, block_size, layout, device, rotate)
    stale = remove_stale(dst)
    _check_replaceable(dst)
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists; pass --overwrite to replace it")
    infos = dict(source.infos)
    int8 = [k for k, i in infos.items() if k.endswith(".weight") and i.dtype == torch.int8]
    if int8:
        raise ConvertError(f"'{int8[0]}' is already int8: dequantize quantized layers before converting them again")
    name = str(getattr(source, "name", "model"))
    info = _SourceInfo(name, name, infos, dict(getattr(source, "metadata", None) or {}), None)
    start = time.perf_counter()
    patterns = resolve_patterns(skip, keep_default_skips)
    plan = plan_conversion(infos, method, block_size, patterns, layout, rotate=rotate)
    total = sum(i.nbytes for i in infos.values())
    bar = _progress(total, progress, name)
    try:
        report = write_atomically(dst, lambda tmp: _write(
            info, source, tmp, plan, method, block_size, layout, device, bar, rotate=rotate), _planned_bytes(plan))
    finally:
        if bar is not None:
            bar.close()
    report.dst = str(dst)
    report.stale_removed = stale
    report.rotation_group = rotate
    report.bytes_before = total
    report.bytes_after = dst.stat().st_size
    report.seconds = time.perf_counter() - start
    return report


def decision_prefix(relative: Path) -> str:
    """``vae/diffusion_pytorch_model.safetensors`` -> ``vae.`` (folder names join the skip decision)."""
    parts = relative.parent.parts
    return "".join(f"{p}." for p in parts)


def _rewrite_index(index: ShardIndex, dst_index: Path, shard_outputs: dict[str, tuple[dict[str, TensorInfo], int]]) -> None:
    """Write a checked ``*.safetensors.index.json`` with its weight_map pointing at the converted shards' tensors."""
    data = dict(index.data)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in dict.fromkeys(index.weight_map.values()):
        tensors, data_bytes = shard_outputs[shard]
        for name in tensors:
            weight_map[name] = shard
        total += data_bytes
    data["weight_map"] = dict(sorted(weight_map.items()))
    data["metadata"] = dict(data.get("metadata") or {}, total_size=total)
    dst_index.write_text(json.dumps(data, indent=2) + "\n")


def convert_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    method: str = "rowwise",
    block_size: int = DEFAULT_BLOCK_SIZE,
    skip: Sequence[str] | str | None = None,
    keep_default_skips: bool = True,
    device: str = "cpu",
    layout: str = "headroom",
    progress: bool = True,
    overwrite: bool = False,
    _fail_after: int | None = None,
    rotate: int = 0,
    loras: Sequence = (),
) -> ConvertReport:
    """Convert every ``*.safetensors`` of a model folder (shards, diffusers sub-folders) into a new folder.

    Index files (``*.safetensors.index.json``) are checked against the shards before anything is written, then
    rewritten for the new tensor names; every other file (config.json, tokenizer files...) is copied. The folder
    is built under a temporary name and renamed.
    """
    src, dst = Path(src), Path(dst)
    _check_options(method, block_size, layout, device, rotate)
    stale = remove_stale(dst)
    _check_paths(src, dst, overwrite)
    shards = checkpoint_files(src)
    headers = {shard: read_header(shard) for shard in shards}
    for header in headers.values():
        refuse_quantized_input(header)
    indexes = {path: read_index(path, headers) for path in sorted(src.rglob(f"*{INDEX_SUFFIX}"))}
    merger = _bound_lora_merger(loras, list(headers.values()))
    patterns = resolve_patterns(skip, keep_default_skips)
    plans = {}
    for shard, header in headers.items():
        plans[shard] = plan_conversion(header, method, block_size, patterns, layout,
                                       decision_prefix(shard.relative_to(src)), rotate=rotate)
        _check_plan(header, plans[shard])
    start = time.perf_counter()
    report = ConvertReport(str(src), str(dst), layout, method, block_size, rotation_group=rotate,
                           stale_removed=stale)

    def write(tmp: Path) -> None:
        outputs: dict[Path, dict[str, tuple[dict[str, TensorInfo], int]]] = {}
        for shard, header in headers.items():
            target = tmp / shard.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            plan = plans[shard]
            report.merge(_write_file(header, target, plan, method, block_size, layout, device, bar,
                                     fail_after=_fail_after, rotate=rotate, lora=merger))
            outputs.setdefault(shard.parent, {})[shard.name] = (plan.tensors, _planned_bytes(plan))
        for path in sorted(src.rglob("*")):
            relative = path.relative_to(src)
            if path.is_dir() or path.suffix == ".safetensors":
                continue
            if _is_pickle_weights(path):  # the .bin twins of safetensors shards: never needed, never loaded
                report.skipped_files.append(str(relative))
                continue
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            if path in indexes:
                _rewrite_index(indexes[path], tmp / relative, outputs.get(path.parent, {}))
            else:
                shutil.copy2(path, tmp / relative)

    needed = sum(_planned_bytes(plan) for plan in plans.values())
    needed += sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and p.suffix != ".safetensors")
    bar = _progress(sum(h.data_bytes for h in headers.values()), progress, src.name)
    try:
        write_atomically(dst, write, needed, folder=True)
    finally:
        if bar is not None:
            bar.close()
    report.loras = merger.summary() if merger else []
    report.bytes_before = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    report.bytes_after = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    report.seconds = time.perf_counter() - start
    return report


def _is_pickle_weights(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in PICKLE_SUFFIXES or any(name.endswith(f"{suffix}.index.json") for suffix in PICKLE_SUFFIXES)


def convert_path(src: str | os.PathLike, dst: str | os.PathLike, **options) -> ConvertReport:
    """:func:`convert_file` for a file, :func:`convert_folder` for a folder.

    A file converted into an existing folder - or into a path written with a trailing slash, which names a folder
    (created when missing) - lands there under its default output name.
    """
    names_folder = str(dst).endswith(("/", os.sep))
    src, dst = Path(src), Path(dst)
    try:
        if src.is_dir():
            return convert_folder(src, dst, **options)
        if names_folder and os.path.lexists(dst) and not dst.is_dir():
            raise ConvertError(f"OUT {dst}{os.sep} names a folder, but {dst} is a file; choose another OUT")
        if src.is_file() and (dst.is_dir() or names_folder):
            dst = dst / default_output(src, options.get("method", "rowwise"), options.get("layout", "headroom")).name
        return convert_file(src, dst, **options)
    except OSError as err:  # is_dir() and friends raise on a name too long
        raise output_error(err, dst, "use") from None


def default_output(src: str | os.PathLike, method: str, layout: str) -> Path:
    """``model.safetensors`` -> ``model-int8-rowwise.safetensors`` (``-int8-comfy`` for the ComfyUI layout)."""
    src = Path(src)
    tag = layout_format(layout).output_tag(method)
    if src.is_dir():
        return src.with_name(f"{src.name}-int8-{tag}")
    return src.with_name(f"{src.stem}-int8-{tag}.safetensors")
