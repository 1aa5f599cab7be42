"""The dtype report: what precision every parameter ended up in, and which skips leaked.

Seed 000's "colourful noise" came from a VAE that a skip pattern meant to keep but that was quantized
anyway; the report makes that visible after every load (``leaks``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .bnb_layers import is_bnb_4bit_weight, is_bnb_quantized
from .skip import matching_pattern

log = logging.getLogger("comfyui_headroom")

EXAMPLES_PER_DTYPE = 3


@dataclass
class DtypeStats:
    parameters: int = 0
    bytes: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class DtypeReport:
    """Per dtype: parameter count, bytes, example names; plus the quantization decisions."""

    dtypes: dict[str, DtypeStats] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> reason
    leaks: list[str] = field(default_factory=list)  # a skip pattern names it, yet it is quantized

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.dtypes.values())

    def as_dict(self) -> dict:
        return {
            "dtypes": {k: {"parameters": v.parameters, "bytes": v.bytes, "examples": v.examples}
                       for k, v in self.dtypes.items()},
            "quantized": list(self.quantized),
            "skipped": dict(self.skipped),
            "leaks": list(self.leaks),
        }

    def __str__(self) -> str:
        lines = [f"dtype report: {len(self.quantized)} layers INT8, {len(self.skipped)} kept in float"]
        for name, stats in sorted(self.dtypes.items(), key=lambda kv: -kv[1].bytes):
            lines.append(f"  {name:>9}: {stats.parameters:,} params, {stats.bytes / 2**20:,.1f} MiB "
                         f"(e.g. {', '.join(stats.examples)})")
        if self.leaks:
            lines.append(f"  WARNING: {len(self.leaks)} layers named by a skip pattern are quantized: "
                         f"{', '.join(self.leaks[:5])}")
        return "\n".join(lines)


def _tensors(module: nn.Module):
    seen: set[int] = set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield name, t


def dtype_report(module: nn.Module, skip_patterns=(), skipped: dict | None = None) -> DtypeReport:
    """Count parameters and buffers per dtype; flag quantized layers that ``skip_patterns`` name.

    A layer counts as quantized when it holds an int8 ``weight`` (ours) or is a bitsandbytes layer
    (``bnb_layers.is_bnb_quantized``: LLM.int8 or 4-bit).
    """
    report = DtypeReport(skipped=dict(skipped or {}))
    for name, t in _tensors(module):
        key = str(t.dtype).replace("torch.", "")
        if is_bnb_4bit_weight(t):
            key = "nf4/fp4"
        stats = report.dtypes.setdefault(key, DtypeStats())
        stats.parameters += t.numel()
        stats.bytes += t.numel() * t.element_size()
        if len(stats.examples) < EXAMPLES_PER_DTYPE:
            stats.examples.append(name)
    for name, sub in module.named_modules():
        if is_quantized_layer(sub):
            report.quantized.append(name)
            if matching_pattern(name, skip_patterns):
                report.leaks.append(name)
    return report


def is_quantized_layer(module: nn.Module) -> bool:
    """Ours (an int8 ``weight``: ``Int8Linear``, the stacked ``Int8GroupedLinear``) or a bitsandbytes layer."""
    if is_bnb_quantized(module):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.int8


_FINITE_CHUNK = 1 << 24  # elements per pass of the NaN/inf check (an fp8 chunk is widened to float32)


def nonfinite(tensor: torch.Tensor) -> str | None:
    """None when ``tensor`` holds no NaN/inf (non-float and meta tensors never do); else how many and where, e.g.
    ``"1 NaN and 2 inf values, the first at [3, 5]"``. One cheap pass (``aminmax`` propagates both); the count
    and position are computed only for a tensor that has them."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[start:start + _FINITE_CHUNK]
        low, high = torch.aminmax(part if part.element_size() > 1 else part.float())
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            continue
        values = tensor.detach().float() if tensor.element_size() == 1 else tensor.detach()
        nans, infs = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        first = [int(i) for i in (~torch.isfinite(values)).nonzero()[0]]
        kinds = " and ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "inf")) if n)
        return f"{kinds} value{'s' if nans + infs > 1 else ''}, the first at {first}"
    return None


def log_report(report: DtypeReport) -> None:
    log.info("%s", report)
    if report.leaks:
        log.warning("layers meant to stay full precision were quantized: %s", ", ".join(report.leaks))
