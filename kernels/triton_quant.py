"""Triton kernel: dynamic per-row symmetric INT8 quantization of activations, in one pass.

``x [M, K]`` (bf16/fp16/fp32) -> ``q int8 [M, K]`` and ``scale float32 [M]``: the function of
:func:`comfyui_headroom.kernels.int8.quantize_activation` (``scale = amax / 127``, 1.0 for an all-zero
row; ``q = round_half_even(x / scale)``), computed as ``amax * fl(1/127)`` (what torch does on CUDA
for a division by a scalar) and ``x * fl(1/scale)``: one reciprocal per row instead of an IEEE division
per element, which made the kernel compute bound. ``q`` can differ from the division by one step when
``x / scale`` lies within an ulp of a rounding tie (about 1e-5 of the values); the scales are equal to
torch's CUDA result. Rows up to ``max_single_pass`` elements are loaded once into registers (read 2
bytes, write 1 byte per element: memory bound); longer rows take a second read.

``GELU`` applies GELU to each value before it is quantized (1: the tanh approximation, 2: the exact erf form):
the MLP's activation and the next layer's quantization in one pass
(:func:`comfyui_headroom.kernels.producers.gelu_quantize`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import next_power_of_2, quant_config
from .launch import cached_launcher


@triton.jit
def round_half_even(v):
    """``torch.round`` (ties to even) for |v| < 2**22: adding 1.5 * 2**23 leaves no fraction bits, so the
    float add itself rounds to the nearest integer, ties to even; two adds instead of floor/compare/select."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_value(x, inv_scale):
    q = round_half_even(x * inv_scale)
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def gelu_tanh(x):
    """``F.gelu(x, approximate="tanh")`` in float32: 0.5 x (1 + tanh(u)) = x * sigmoid(2u)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) (x + 0.044715 x^3)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def gelu_erf(x):
    """``F.gelu(x)`` (exact) in float32: 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu(x, GELU: tl.constexpr):
    """``x`` through the GELU that ``GELU`` names (0: none); gelu(0) = 0 keeps masked lanes out of a row's amax."""
    if GELU == 1:
        x = gelu_tanh(x)
    elif GELU == 2:
        x = gelu_erf(x)
    return x


@triton.jit
def _row_scale(amax):
    scale = tl.where(amax > 0.0, amax * 0.007874015718698502, 1.0)  # fl32(1/127)
    return scale, 1.0 / scale


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_xm,
    BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr, GELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    if SINGLE_PASS:
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = _gelu(tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32), GELU)
        amax = tl.max(tl.abs(x), axis=0)
        scale, inv_scale = _row_scale(amax)
        tl.store(q_row + offs, _quantize_value(x, inv_scale), mask=mask)
    else:
        amax_vec = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = _gelu(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32), GELU)
            amax_vec = tl.maximum(amax_vec, tl.abs(x))
        amax = tl.max(amax_vec, axis=0)
        scale, inv_scale = _row_scale(amax)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = _gelu(tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32), GELU)
            tl.store(q_row + offs, _quantize_value(x, inv_scale), mask=mask)
    tl.store(scale_ptr + row, scale)


_launch_quantize_rows = cached_launcher(_quantize_rows_kernel)


def row_block(k: int) -> tuple[int, bool, int]:
    """(BLOCK_K, single pass, num_warps) for rows of ``k`` values: one choice for every row-wise kernel."""
    cfg = quant_config()
    single = k <= cfg.max_single_pass
    block = next_power_of_2(k) if single else cfg.loop_block
    return block, single, cfg.num_warps if block >= 2048 else 4


GELU_MODES = {None: 0, "tanh": 1, "none": 2}  # ``approximate`` as F.gelu spells it -> the kernel's GELU


def launch_args(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, gelu: str | None = None):
    """(grid, runtime args, keyword args) of the quantization launch for a 2-D ``x``: shared by
    :func:`quantize_rows` and the launch plans (:mod:`.plans`)."""
    if gelu not in GELU_MODES:
        raise ValueError(f"quantize_rows: gelu={gelu!r}; use None, 'tanh' or 'none' (exact), as F.gelu's approximate")
    m, k = x.shape
    block, single, warps = row_block(k)
    # Every constexpr by keyword, defaults included: the launcher keeps only such calls (kernels/launch.py).
    return (m,), (x, q, scale, k, x.stride(0)), dict(BLOCK_K=block, SINGLE_PASS=single, GELU=GELU_MODES[gelu],
                                                     num_warps=warps)


def quantize_rows(
    x: torch.Tensor, q_out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None,
    gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (unit column stride) -> ``(int8 [M, K], float32 [M])``; optional preallocated outputs;
    ``gelu="tanh"`` / ``"none"`` quantizes ``F.gelu(x, approximate=gelu)`` instead of ``x``."""
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows expects a 2-D tensor with contiguous rows, got {tuple(x.shape)} {x.stride()}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device) if q_out is None else q_out
    scale = torch.empty((m,), dtype=torch.float32, device=x.device) if scale_out is None else scale_out
    if (q_out is not None or scale_out is not None) and (
            q.shape != (m, k) or q.dtype != torch.int8 or not q.is_contiguous() or scale.shape != (m,)):
        raise ValueError(f"quantize_rows: outputs must be contiguous int8 {(m, k)} and float32 {(m,)}")
    if m == 0:
        return q, scale
    grid, args, kwargs = launch_args(x, q, scale, gelu)
    _launch_quantize_rows(grid, *args, **kwargs)
    return q, scale
