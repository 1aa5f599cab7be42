"""``headroom inspect``: what a checkpoint is and how much VRAM its weights would take, from headers only.

VRAM estimates count parameters, not bytes on disk:

* quantizable weights = the INT8 weights of a quantized file, or for a float/fp8 file the 2-D weights the
  converter would quantize with the default rules (rowwise, default skip patterns);
* bf16  = every parameter at 2 bytes;
* INT8  = quantizable weights at 1 byte + their float32 scales (the file's own, or one per output row);
* NF4   = quantizable weights at 0.5 byte + one float32 absmax per 64 weights (bitsandbytes' block size);
* everything else (norms, biases, embeddings, skipped layers) at 2 bytes in every column.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..kernels.int8 import DEFAULT_BLOCK_SIZE
from ..units import format_gib
from .convert import decision_prefix, plan_conversion
from .formats import (
    FP8_MARKER_KEY,
    META_METHOD,
    FileInfo,
    checkpoint_files,
    describe_header,
    is_headroom_metadata,
    layer_format,
    merge_infos,
    model_groups,
    quantization_keys,
    separate_models_note,
)
from .safetensors_stream import Header, read_header
from .skip import resolve_patterns

NF4_BLOCK = 64
BF16_BYTES = 2


@dataclass
class VramEstimate:
    quantizable_parameters: int = 0
    other_parameters: int = 0
    int8_scale_bytes: int = 0

    @property
    def bf16_bytes(self) -> int:
        return BF16_BYTES * (self.quantizable_parameters + self.other_parameters)

    @property
    def int8_bytes(self) -> int:
        return self.quantizable_parameters + self.int8_scale_bytes + BF16_BYTES * self.other_parameters

    @property
    def nf4_bytes(self) -> int:
        absmax = 4 * -(-self.quantizable_parameters // NF4_BLOCK)
        return self.quantizable_parameters // 2 + absmax + BF16_BYTES * self.other_parameters

    def add(self, other: "VramEstimate") -> None:
        self.quantizable_parameters += other.quantizable_parameters
        self.other_parameters += other.other_parameters
        self.int8_scale_bytes += other.int8_scale_bytes

    def as_dict(self) -> dict:
        return {"quantizable_parameters": self.quantizable_parameters, "other_parameters": self.other_parameters,
                "bf16_bytes": self.bf16_bytes, "int8_bytes": self.int8_bytes, "nf4_bytes": self.nf4_bytes}


def _printable(text: str, limit: int = 200) -> str:
    """A header string as one safe line: control characters (newlines, terminal escapes) shown escaped, long ones cut."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass
class InspectReport:
    info: FileInfo
    vram: VramEstimate
    would_quantize: int = 0  # float files: layers the default conversion would quantize
    would_keep: int = 0
    notes: list[str] = field(default_factory=list)
    models: list["InspectReport"] = field(default_factory=list)  # a folder of separate checkpoints: one each

    def as_dict(self) -> dict:
        if self.models:
            return {"path": self.info.path, "separate_models": [m.as_dict() for m in self.models],
                    "notes": list(self.notes)}
        data = self.info.as_dict()
        data["layers_quantized"] = len(self.info.quantized_layers)
        data["layers_skipped"] = len(self.info.skipped_layers)
        data["would_quantize"] = self.would_quantize
        data["would_keep"] = self.would_keep
        data["vram_estimate"] = self.vram.as_dict()
        data["label"] = self.info.label
        data["notes"] = list(self.notes)
        return data

    def __str__(self) -> str:
        if self.models:
            return "\n\n".join(["\n".join(f"note: {n}" for n in self.notes)] + [str(m) for m in self.models])
        info = self.info
        lines = [str(info.path)]
        if info.format == "float":
            kind = "float (not quantized)" + (f", {len(info.fp8_layers)} fp8 layers" if info.fp8_layers else "")
            lines.append(f"  format      {kind}")
            lines.append(f"  layers      a default conversion would quantize {self.would_quantize}, "
                         f"keep {self.would_keep} in float")
        else:
            lines.append(f"  format      {info.label}, method {info.method}"
                         + (f", block size {info.block_size}" if info.block_size else ""))
            lines.append(f"  layers      {len(info.quantized_layers)} quantized, {len(info.skipped_layers)} kept in float")
        dtypes = ", ".join(f"{name} {d['tensors']} tensors / {d['parameters']:,} params"
                           for name, d in sorted(info.dtypes.items(), key=lambda kv: -kv[1]["bytes"]))
        lines.append(f"  dtypes      {dtypes}")
        lines.append(f"  parameters  {info.parameters:,}" + (f" in {len(info.files)} files" if len(info.files) > 1 else ""))
        lines.append(f"  on disk     {format_gib(info.total_bytes)}")
        lines.append(f"  VRAM for weights (estimate): bf16 {format_gib(self.vram.bf16_bytes)} | INT8 {format_gib(self.vram.int8_bytes)}"
                     f" | NF4 {format_gib(self.vram.nf4_bytes)}")
        for key in ("headroom.source_file", "headroom.tool_version"):
            if key in info.metadata:
                lines.append(f"  {key.split('.', 1)[1].replace('_', ' '):<11} {_printable(info.metadata[key])}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _estimate(header: Header, info: FileInfo, name_prefix: str) -> tuple[VramEstimate, int, int]:
    estimate = VramEstimate()
    overhead: set[str] = {FP8_MARKER_KEY}
    if info.is_quantized:
        quantized = {f"{layer}.weight" for layer in info.quantized_layers}
        would_q = would_k = 0
    else:
        plan = plan_conversion(header, "rowwise", DEFAULT_BLOCK_SIZE, resolve_patterns(None), "headroom", name_prefix)
        quantized = {job.key for job in plan.jobs if job.action == "quantize"}
        would_q, would_k = len(quantized), len(plan.kept)
    for key in quantized:
        prefix = key[: -len("weight")]
        overhead.update(quantization_keys(header.tensors, prefix))
        scale_key = None
        if info.is_quantized:  # the file's own scale, where its format keeps it; else one per output row
            scale_key = layer_format(header.tensors, prefix, header.metadata).scale_key(header.tensors, prefix)
        scales = header.tensors[scale_key].numel if scale_key else header.tensors[key].shape[0]
        estimate.int8_scale_bytes += 4 * scales
    for key, tensor in header.tensors.items():
        if key in quantized:
            estimate.quantizable_parameters += tensor.numel
        elif key not in overhead:
            estimate.other_parameters += tensor.numel
    return estimate, would_q, would_k


def _report(path: Path, files: list[Path], headers: dict[Path, Header], folder: Path | None) -> InspectReport:
    """One checkpoint: a file, or the files of a folder that form one model (``folder``: prefixes for the skip rules)."""
    infos, total, would_q, would_k = [], VramEstimate(), 0, 0
    for file in files:
        header = headers[file]
        info = describe_header(header)
        prefix = decision_prefix(file.relative_to(folder)) if folder is not None else ""
        estimate, q, k = _estimate(header, info, prefix)
        total.add(estimate)
        would_q, would_k = would_q + q, would_k + k
        infos.append(info)
    info = merge_infos(path, infos) if path.is_dir() else infos[0]
    report = InspectReport(info, total, would_q, would_k)
    if info.fp8_layers and info.is_quantized:
        report.notes.append(f"{len(info.fp8_layers)} fp8 layers next to INT8 ones: a mixed file")
    recorded = info.metadata.get(META_METHOD) if is_headroom_metadata(info.metadata) else None
    if recorded and info.method and recorded != info.method:
        report.notes.append(f"the header says method {recorded}, the scales say {info.method}: loaders go by the "
                            f"scales")
    return report


def inspect_path(path: str | os.PathLike) -> InspectReport:
    """Describe a safetensors file or a folder of them (headers only). A folder that holds separate checkpoints
    (a bf16 model next to its INT8 conversion, say: :func:`.formats.model_groups`) is reported one by one."""
    path = Path(path)
    headers = {f: read_header(f) for f in checkpoint_files(path)}
    if not path.is_dir():
        return _report(path, [path], headers, None)
    groups = model_groups(path, headers)
    note = separate_models_note(groups, path)
    if note is None:
        return _report(path, list(headers), headers, path)
    models = [_report(group[0] if len(group) == 1 else group[0].parent, group, headers, path) for group in groups]
    report = InspectReport(merge_infos(path, [m.info for m in models]), VramEstimate(), models=models)
    report.notes.append(f"{note}: each is reported on its own")
    return report
