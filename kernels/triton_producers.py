"""Triton kernels that write a W8A8 layer's input in INT8 directly (see :mod:`.producers` for why and when).

* :func:`norm_modulate_quantize` - optional gated residual ``x + gate * y``, LayerNorm (no affine),
  adaLN modulation ``* (1 + scale) + shift``, per-row INT8: one program per row, the row held in registers,
  read once. ``shift``/``scale``/``gate`` are per group of ``rows_per_group`` rows (one group per image of
  the batch, as a DiT's timestep modulation is).
* :func:`quantize_heads` - per-row INT8 of an attention output ``[B, H, N, D]`` read as the ``[B*N, H*D]``
  rows its output projection multiplies, without the ``transpose(1, 2).reshape`` copy first.
* :func:`silu_mul_quantize` - per-row INT8 of ``silu(gate) * up`` (a SwiGLU MLP's down-projection input);
  ``gate`` and ``up`` may be row-strided views such as the two halves of one tensor; rows of any length.
* :func:`rms_norm_scale_quantize` - RMSNorm (optional weight), ``* (1 + scale)`` per group of rows, per-row
  INT8: one program per row, like :func:`norm_modulate_quantize`.
* :func:`rms_norm_residual_scale_quantize` - first ``x + tanh(gate) * rms_norm(y)`` (a layer output ``y`` normed,
  gated and added to the residual stream, each step rounded to ``x``'s dtype), then the above on the new ``x``.

The quantization itself (scale = amax / 127, round half to even, clamp to +-127) is the one of
:mod:`.triton_quant`, so a producer's INT8 equals ``quantize_rows`` of the float value it computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .support import KernelUnsupported
from .launch import cached_launcher
from .triton_quant import _quantize_value, _row_scale, gelu_tanh, row_block


@triton.jit
def _norm_modulate_quantize_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, x_out_ptr, q_ptr, s_ptr,
    K, rows_per_group, stride_x, stride_y, stride_x_out, stride_mod, eps,
    BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_group
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    mod = group * stride_mod + offs
    if HAS_RESIDUAL:
        y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + mod, mask=mask, other=0.0).to(tl.float32)
        x_new = (x + gate * y).to(x_out_ptr.dtype.element_ty)
        tl.store(x_out_ptr + row * stride_x_out + offs, x_new, mask=mask)
        x = x_new.to(tl.float32)  # normalise the residual stream as the next block will see it
    mean = tl.sum(x, axis=0) / K
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
    scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    h = tl.where(mask, centred * rstd * (1.0 + scale) + shift, 0.0)
    s, inv_s = _row_scale(tl.max(tl.abs(h), axis=0))
    tl.store(q_ptr + row * K + offs, _quantize_value(h, inv_s), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _quantize_heads_kernel(
    o_ptr, q_ptr, s_ptr, tokens, K, stride_b, stride_h, stride_n,
    HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = b * tokens + n
    b = row // tokens
    n = row % tokens
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    src = o_ptr + b * stride_b + n * stride_n + (offs // HEAD_DIM) * stride_h + offs % HEAD_DIM
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    s, inv_s = _row_scale(tl.max(tl.abs(x), axis=0))
    tl.store(q_ptr + row * K + offs, _quantize_value(x, inv_s), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _silu_mul_value(gate_row, up_row, offs, K):
    mask = offs < K
    g = tl.load(gate_row + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_row + offs, mask=mask, other=0.0).to(tl.float32)
    return g * tl.sigmoid(g) * u  # masked lanes: 0 * 0.5 * 0 = 0, out of the row's amax


@triton.jit
def _silu_mul_quantize_kernel(
    gate_ptr, up_ptr, q_ptr, s_ptr, K, stride_gate, stride_up,
    BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    gate_row = gate_ptr + row * stride_gate
    up_row = up_ptr + row * stride_up
    if SINGLE_PASS:  # the row in registers, read once
        offs = tl.arange(0, BLOCK_K)
        h = _silu_mul_value(gate_row, up_row, offs, K)
        s, inv_s = _row_scale(tl.max(tl.abs(h), axis=0))
        tl.store(q_ptr + row * K + offs, _quantize_value(h, inv_s), mask=offs < K)
    else:  # longer rows (Flux 2's 18432-wide MLP): amax in a first pass, the values again in a second
        amax_vec = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            h = _silu_mul_value(gate_row, up_row, k0 + tl.arange(0, BLOCK_K), K)
            amax_vec = tl.maximum(amax_vec, tl.abs(h))
        s, inv_s = _row_scale(tl.max(amax_vec, axis=0))
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            h = _silu_mul_value(gate_row, up_row, offs, K)
            tl.store(q_ptr + row * K + offs, _quantize_value(h, inv_s), mask=offs < K)
    tl.store(s_ptr + row, s)


@triton.jit
def _rms_norm_row(v, weight_ptr, offs, mask, K, eps, HAS_WEIGHT: tl.constexpr):
    """``F.rms_norm`` of one row held in float32: ``v * rsqrt(mean(v^2) + eps)`` (``* weight``)."""
    h = v * (1.0 / tl.sqrt(tl.sum(v * v, axis=0) / K + eps))
    if HAS_WEIGHT:
        h = h * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _scale_quantize_store(h, row, group, offs, mask, K, scale_ptr, stride_scale, q_ptr, s_ptr):
    """``h * (1 + scale[group])`` stored as the row's INT8 values and its scale."""
    scale = tl.load(scale_ptr + group * stride_scale + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.where(mask, h * (1.0 + scale), 0.0)
    s, inv_s = _row_scale(tl.max(tl.abs(h), axis=0))
    tl.store(q_ptr + row * K + offs, _quantize_value(h, inv_s), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _rms_norm_scale_quantize_kernel(
    x_ptr, weight_ptr, scale_ptr, q_ptr, s_ptr,
    K, rows_per_group, stride_x, stride_scale, eps,
    BLOCK_K: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_group
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    h = _rms_norm_row(x, weight_ptr, offs, mask, K, eps, HAS_WEIGHT)
    _scale_quantize_store(h, row, group, offs, mask, K, scale_ptr, stride_scale, q_ptr, s_ptr)


@triton.jit
def _rms_norm_residual_scale_quantize_kernel(
    x_ptr, y_ptr, y_weight_ptr, gate_ptr, weight_ptr, scale_ptr, x_out_ptr, q_ptr, s_ptr,
    K, rows_per_group, stride_x, stride_y, stride_gate, stride_scale, eps_y, eps,
    BLOCK_K: tl.constexpr, HAS_Y_WEIGHT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = row // rows_per_group
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    out_ty = x_out_ptr.dtype.element_ty
    # the layer output's norm, gate and residual add, rounded where ComfyUI's torch ops round them
    y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    t = _rms_norm_row(y, y_weight_ptr, offs, mask, K, eps_y, HAS_Y_WEIGHT).to(out_ty).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + group * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
        g = (2.0 * tl.sigmoid(2.0 * g) - 1.0).to(out_ty).to(tl.float32)  # tanh
        t = (g * t).to(out_ty).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    x_new = (x + t).to(out_ty)
    tl.store(x_out_ptr + row * K + offs, x_new, mask=mask)
    # the next layer's input: rms_norm(x') (* weight) * (1 + scale), per-row INT8
    h = _rms_norm_row(x_new.to(tl.float32), weight_ptr, offs, mask, K, eps, HAS_WEIGHT)
    _scale_quantize_store(h, row, group, offs, mask, K, scale_ptr, stride_scale, q_ptr, s_ptr)


@triton.jit
def _heads_activation_value(o_ptr, m_row, offs, b, n, K1, F, stride_b, stride_h, stride_n,
                            HEAD_DIM: tl.constexpr, SILU_GATE: tl.constexpr):
    """Values ``offs`` of one row of ``[heads | act(mlp)]``: attention heads first, then the MLP activation of the
    row's ``mlp`` values at ``m_row``."""
    in_heads = offs < K1
    head_src = o_ptr + b * stride_b + n * stride_n + (offs // HEAD_DIM) * stride_h + offs % HEAD_DIM
    x = tl.load(head_src, mask=in_heads, other=0.0).to(tl.float32)
    f = offs - K1
    in_mlp = (f >= 0) & (f < F)
    a = tl.load(m_row + f, mask=in_mlp, other=0.0).to(tl.float32)
    if SILU_GATE:
        up = tl.load(m_row + F + f, mask=in_mlp, other=0.0).to(tl.float32)
        a = a * tl.sigmoid(a) * up
    else:
        a = gelu_tanh(a)
    return tl.where(in_heads, x, tl.where(in_mlp, a, 0.0))


@triton.jit
def _heads_activation_quantize_kernel(
    o_ptr, m_ptr, q_ptr, s_ptr, tokens, K1, F, stride_b, stride_h, stride_n, stride_m_row,
    HEAD_DIM: tl.constexpr, SILU_GATE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row = b * tokens + n
    b = row // tokens
    n = row % tokens
    K = K1 + F
    m_row = m_ptr + row * stride_m_row
    amax_vec = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = _heads_activation_value(o_ptr, m_row, offs, b, n, K1, F, stride_b, stride_h, stride_n, HEAD_DIM,
                                    SILU_GATE)
        amax_vec = tl.maximum(amax_vec, tl.abs(v))
    s, inv_s = _row_scale(tl.max(amax_vec, axis=0))
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = _heads_activation_value(o_ptr, m_row, offs, b, n, K1, F, stride_b, stride_h, stride_n, HEAD_DIM,
                                    SILU_GATE)
        tl.store(q_ptr + row * K + offs, _quantize_value(v, inv_s), mask=offs < K)
    tl.store(s_ptr + row, s)


_launch_norm_modulate = cached_launcher(_norm_modulate_quantize_kernel)
_launch_heads = cached_launcher(_quantize_heads_kernel)
_launch_heads_activation = cached_launcher(_heads_activation_quantize_kernel)
_launch_silu_mul = cached_launcher(_silu_mul_quantize_kernel)
_launch_rms_norm_scale = cached_launcher(_rms_norm_scale_quantize_kernel)
_launch_rms_norm_residual_scale = cached_launcher(_rms_norm_residual_scale_quantize_kernel)


def _single_pass_block(k: int, what: str) -> tuple[int, int]:
    block, single, warps = row_block(k)
    if not single:
        raise KernelUnsupported(f"{what}: rows of {k} values are longer than one pass holds")
    return block, warps


def norm_modulate_quantize(x, shift, scale, rows_per_group: int, eps: float, y=None, gate=None):
    """``x [M, K]`` (rows contiguous), ``shift``/``scale``/``gate`` ``[M / rows_per_group, K]`` (rows contiguous,
    any row stride, the same for all three), optional ``y [M, K]``.

    -> ``(q int8 [M, K], scale float32 [M], x_new)``: ``x_new = x + gate * y`` in ``x.dtype`` (None without
    ``y``), then ``q, scale`` = per-row INT8 of ``layer_norm(x_new) * (1 + scale) + shift``.
    """
    m, k = x.shape
    block, warps = _single_pass_block(k, "norm_modulate_quantize")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    residual = y is not None
    x_new = torch.empty_like(x, memory_format=torch.contiguous_format) if residual else None
    if m:
        _launch_norm_modulate(
            (m,), x, y if residual else x, gate if residual else shift, shift, scale, x_new if residual else x, q, s,
            k, rows_per_group, x.stride(0), y.stride(0) if residual else 0, k, shift.stride(0), float(eps),
            BLOCK_K=block, HAS_RESIDUAL=residual, num_warps=warps)
    return q, s, x_new


def quantize_heads(o):
    """``o [B, H, N, D]`` (unit stride in D) -> ``(q int8 [B*N, H*D], scale float32 [B*N])``: the per-row INT8
    of ``o.transpose(1, 2).reshape(B*N, H*D)``."""
    b, h, n, d = o.shape
    k = h * d
    block, warps = _single_pass_block(k, "quantize_heads")
    q = torch.empty((b * n, k), dtype=torch.int8, device=o.device)
    s = torch.empty((b * n,), dtype=torch.float32, device=o.device)
    if b * n:
        _launch_heads((b * n,), o, q, s, n, k, o.stride(0), o.stride(1), o.stride(2),
                      HEAD_DIM=d, BLOCK_K=block, num_warps=warps)
    return q, s


def _int8_rows_out(m: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((m, k), dtype=torch.int8, device=device),
            torch.empty((m,), dtype=torch.float32, device=device))


def silu_mul_quantize(gate, up):
    """``gate``, ``up`` ``[M, I]`` (unit stride in I, any row stride each) -> ``(q int8 [M, I], scale float32
    [M])``: the per-row INT8 of ``silu(gate) * up``. Rows longer than one pass holds are read twice."""
    m, k = gate.shape
    block, single, warps = row_block(k)  # rows of any length: two reads of a row past one pass
    q, s = _int8_rows_out(m, k, gate.device)
    if m:
        _launch_silu_mul((m,), gate, up, q, s, k, gate.stride(0), up.stride(0), BLOCK_K=block, SINGLE_PASS=single,
                         num_warps=warps)
    return q, s


def rms_norm_scale_quantize(x, weight, scale, rows_per_group: int, eps: float):
    """``x [M, K]`` (unit stride in K), ``weight [K]`` contiguous or None, ``scale [M / rows_per_group, K]`` (unit
    stride in K) -> ``(q int8 [M, K], scale float32 [M])``: per-row INT8 of ``rms_norm(x, weight) * (1 + scale)``."""
    m, k = x.shape
    block, warps = _single_pass_block(k, "rms_norm_scale_quantize")
    q, s = _int8_rows_out(m, k, x.device)
    if m:
        has_weight = weight is not None
        _launch_rms_norm_scale((m,), x, weight if has_weight else scale, scale, q, s, k, rows_per_group, x.stride(0),
                               scale.stride(0), float(eps), BLOCK_K=block, HAS_WEIGHT=has_weight, num_warps=warps)
    return q, s


def rms_norm_residual_scale_quantize(x, y, y_weight, gate, weight, scale, rows_per_group: int, eps_y: float,
                                     eps: float):
    """``x``, ``y`` ``[M, K]`` (unit stride in K), ``y_weight`` / ``weight`` ``[K]`` contiguous or None, ``gate`` /
    ``scale`` ``[M / rows_per_group, K]`` (unit stride in K; ``gate`` may be None) -> ``(q int8 [M, K], scale
    float32 [M], x_new [M, K])``: ``x_new = x + tanh(gate) * rms_norm(y, y_weight)`` in ``x.dtype``, then per-row INT8
    of ``rms_norm(x_new, weight) * (1 + scale)``."""
    m, k = x.shape
    block, warps = _single_pass_block(k, "rms_norm_residual_scale_quantize")
    q, s = _int8_rows_out(m, k, x.device)
    x_new = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m:
        _launch_rms_norm_residual_scale(
            (m,), x, y, scale if y_weight is None else y_weight, scale if gate is None else gate,
            scale if weight is None else weight, scale, x_new, q, s, k, rows_per_group, x.stride(0), y.stride(0),
            0 if gate is None else gate.stride(0), scale.stride(0), float(eps_y), float(eps), BLOCK_K=block,
            HAS_Y_WEIGHT=y_weight is not None, HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None,
            num_warps=warps)
    return q, s, x_new


def heads_activation_quantize(o, mlp, silu_gate: bool):
    """``o [B, H, N, D]`` (unit stride in D) and ``mlp [B*N, F or 2F]`` (unit stride in F, any row stride) ->
    ``(q int8 [B*N, H*D + F], scale float32 [B*N])``: per-row INT8 of ``[o as rows | act(mlp)]`` with ``act`` tanh
    GELU, or with ``silu_gate`` ``silu(first half) * second half``. Rows of any length (two reads of a row)."""
    b, h, n, d = o.shape
    k1 = h * d
    f = mlp.shape[1] // 2 if silu_gate else mlp.shape[1]
    q, s = _int8_rows_out(b * n, k1 + f, o.device)
    block, _, warps = row_block(k1 + f)  # one block per row when it fits, else the loop block
    if b * n:
        _launch_heads_activation((b * n,), o, mlp, q, s, n, k1, f, o.stride(0), o.stride(1), o.stride(2),
                                 mlp.stride(0), HEAD_DIM=d, SILU_GATE=silu_gate, BLOCK_K=block, num_warps=warps)
    return q, s
