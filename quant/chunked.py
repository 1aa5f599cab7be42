"""Large weights a few rows at a time: read as float32 (fp8 times its stored scale) and quantize to INT8.

Both the converter and the ComfyUI loader quantize weights that may be memory-mapped, fp8, or hundreds of
millions of parameters: a float32 copy of the whole weight would cost GBs of RAM. Row and block scales are per
row, so quantizing chunks of rows gives bit-identical results; a tensorwise scale takes a first pass for the
global absmax.
"""

from __future__ import annotations

import math

import torch

from ..kernels.int8 import FP8_DTYPES, QMAX, dequantize_weight, quantize_weight, scale_from_amax
from ..kernels.rotation import rotate_weight

CHUNK_ELEMENTS = 8 * 2**20  # float32 elements handled at once (32 MB; temporaries ~5x that)


class WeightError(ValueError):
    """A stored weight that cannot be used as it is (NaN/inf values, an fp8 scale that does not fit it);
    the message names the tensor."""


def rows_per_chunk(in_features: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, in_features))


def fp8_scale_shapes(out_features: int) -> tuple[tuple[int, ...], ...]:
    """The shapes an fp8 weight's stored scale may have: one value, or one per output row (``[out]``, ``[out, 1]``).
    Anything else - ``[1, in]`` of a square weight, ``[2, out / 2]``, block scales - would broadcast wrongly."""
    return ((), (1,), (1, 1), (out_features,), (out_features, 1))


def float_rows(weight: torch.Tensor, start: int = 0, stop: int | None = None, scale: torch.Tensor | None = None,
               device=None, name: str = "weight") -> torch.Tensor:
    """Rows ``start:stop`` of a stored ``[out, in]`` weight as float32 on ``device``; a scaled fp8 weight is
    multiplied by its stored ``scale`` (one value, or one per output row). WeightError naming ``name`` when the
    scale has any other shape (never broadcast)."""
    stop = weight.shape[0] if stop is None else min(stop, weight.shape[0])
    if scale is not None and tuple(scale.shape) not in fp8_scale_shapes(weight.shape[0]):
        raise WeightError(f"'{name}': fp8 scale of shape {list(scale.shape)} does not fit the weight "
                          f"{list(weight.shape)} (expected one value, [out] or [out, 1]); re-export the file")
    rows = weight[start:stop].to(device=device).float()
    if scale is None:
        return rows
    scale = scale.to(device=device, dtype=torch.float32)
    if scale.numel() == 1:
        return rows * scale.reshape(())
    return rows * scale.reshape(-1)[start:stop].reshape(-1, 1)


def check_finite(rows: torch.Tensor, name: str) -> None:
    """WeightError naming ``name`` when ``rows`` holds NaN or inf (aminmax propagates both; one cheap pass)."""
    if rows.dtype in FP8_DTYPES:
        rows = rows.float()
    low, high = torch.aminmax(rows)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        bad = "NaN" if bool(torch.isnan(low) or torch.isnan(high)) else "inf"
        raise WeightError(f"tensor '{name}' contains {bad} values; the source checkpoint is damaged "
                          f"(re-download or re-export it)")


def quantize_streamed(
    weight: torch.Tensor,
    method: str,
    block_size: int,
    name: str,
    fp8_scale: torch.Tensor | None = None,
    device="cpu",
    rotation: int = 0,
    rows_hook=None,
    chunk_elements: int = CHUNK_ELEMENTS,
    measure_error: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Quantize a (possibly memory-mapped, possibly fp8) ``[out, in]`` weight chunk by chunk.

    Each chunk of rows is read as float32 on ``device`` (:func:`float_rows`), passed through ``rows_hook(rows,
    start)`` (a LoRA merge) and, with ``rotation`` > 0, Hadamard-rotated (``W H``) before it is quantized.
    Returns ``(int8 [out, in], float32 scale, relative error)`` on the CPU, bit-identical to
    :func:`.int8.quantize_weight` of the whole (hooked, rotated) weight; the error is None without
    ``measure_error`` (it costs a dequantization per chunk). WeightError on NaN/inf or a misfit fp8 scale.
    """
    out_features, in_features = weight.shape
    step = rows_per_chunk(in_features, chunk_elements)

    def rows_at(start: int) -> torch.Tensor:
        rows = float_rows(weight, start, start + step, fp8_scale, device, name)
        if rows_hook is not None:
            rows = rows_hook(rows, start)
        return rotate_weight(rows, rotation) if rotation else rows

    global_scale = None
    if method == "tensorwise":  # one scale for all rows: find the global absmax first
        amax = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, out_features, step):
            rows = rows_at(start)
            check_finite(rows, name)
            amax = torch.maximum(amax, rows.abs().amax())
        global_scale = scale_from_amax(amax)
    qweight = torch.empty(out_features, in_features, dtype=torch.int8)
    scales, err2, ref2 = [], 0.0, 0.0
    for start in range(0, out_features, step):
        rows = rows_at(start)
        if global_scale is None:
            check_finite(rows, name)
            q, scale = quantize_weight(rows, method, block_size)
            scales.append(scale.cpu())
        else:
            q, scale = torch.round(rows / global_scale).clamp_(-QMAX, QMAX).to(torch.int8), global_scale
        if measure_error:
            # float64 sums: the squares of a large-but-finite float32 weight overflow float32 (the error read "nan%")
            ref2 += float(torch.linalg.vector_norm(rows, dtype=torch.float64)) ** 2
            back = dequantize_weight(q, scale, torch.float32, block_size)
            err2 += float(torch.linalg.vector_norm(back.sub_(rows), dtype=torch.float64)) ** 2
        qweight[start:start + step] = q.cpu()
    scale = global_scale.cpu().float() if global_scale is not None else torch.cat(scales, dim=0)
    if not measure_error:
        return qweight, scale, None
    return qweight, scale, math.sqrt(err2 / ref2) if ref2 > 0 else math.sqrt(err2)
