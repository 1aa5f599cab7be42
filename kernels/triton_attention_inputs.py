"""Triton kernel for :mod:`.attention_inputs`: q/k RMSNorm + RoPE + the ``[B, H, N, D]`` head layout in one pass.

One program per (token, group of heads): it reads the token's q, k and v heads from the projection output (any
strides with unit stride in D), RMS-normalises q and k over D with their weights and rounds them to the output dtype
(as ComfyUI's norm modules return them), rotates each (even, odd) pair by the token's 2x2 RoPE matrix in float32
(ComfyUI's ``apply_rope1``: ``out[2i + r] = f[i, r, 0] * x[2i] + f[i, r, 1] * x[2i + 1]``) and stores q, k, v at
row ``offset + n`` of the ``[B, H, N_total, D]`` buffers the attention reads - so a joint text + image sequence is
written in place, without a concatenation copy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import cached_launcher
from .support import KernelUnsupported


@triton.jit
def _norm_rope_pair(x_ptr, w_ptr, f00, f01, f10, f11, offs_h, offs_j, mask, eps, D: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr, out_dtype: tl.constexpr):
    """The (even, odd) halves of ``[BLOCK_H, D]`` heads at ``x_ptr`` (rows ``offs_h`` already scaled by the head
    stride), RMS-normed (weight optional), rounded to ``out_dtype``, then rotated (float32)."""
    even = tl.load(x_ptr + offs_h + 2 * offs_j, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + offs_h + 2 * offs_j + 1, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(even * even, axis=1) + tl.sum(odd * odd, axis=1)) / D + eps)
    even = even * rstd[:, None]
    odd = odd * rstd[:, None]
    if HAS_WEIGHT:
        even = even * tl.load(w_ptr + 2 * offs_j).to(tl.float32)
        odd = odd * tl.load(w_ptr + 2 * offs_j + 1).to(tl.float32)
    even = even.to(out_dtype).to(tl.float32)  # the norm's output, as the next op sees it
    odd = odd.to(out_dtype).to(tl.float32)
    if HAS_ROPE:
        return f00 * even + f01 * odd, f10 * even + f11 * odd
    return even, odd


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, pe_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
    N, H, offset, eps_q, eps_k,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
    spe_b, spe_n, so_b, so_h, so_n,
    D: tl.constexpr, BLOCK_H: tl.constexpr, HAS_Q_WEIGHT: tl.constexpr, HAS_K_WEIGHT: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // N
    n = token % N
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, D // 2)
    head_ok = heads < H
    mask = head_ok[:, None]
    out_dtype = q_out_ptr.dtype.element_ty
    f00 = 0.0  # unused without RoPE
    f01 = 0.0
    f10 = 0.0
    f11 = 0.0
    if HAS_ROPE:  # the token's D/2 rotation matrices [D/2, 2, 2]; the sequence position counts from `offset`
        pe_row = pe_ptr + b * spe_b + (offset + n) * spe_n + 4 * offs_j
        f00 = tl.load(pe_row)[None, :]
        f01 = tl.load(pe_row + 1)[None, :]
        f10 = tl.load(pe_row + 2)[None, :]
        f11 = tl.load(pe_row + 3)[None, :]
    h64 = heads[:, None].to(tl.int64)
    out_row = b * so_b + (offset + n) * so_n + h64 * so_h
    for which in tl.static_range(2):
        if which == 0:
            even, odd = _norm_rope_pair(q_ptr + b * sq_b + n * sq_n, qw_ptr, f00, f01, f10, f11, h64 * sq_h,
                                        offs_j[None, :], mask, eps_q, D, HAS_Q_WEIGHT, HAS_ROPE, out_dtype)
            dst = q_out_ptr + out_row
        else:
            even, odd = _norm_rope_pair(k_ptr + b * sk_b + n * sk_n, kw_ptr, f00, f01, f10, f11, h64 * sk_h,
                                        offs_j[None, :], mask, eps_k, D, HAS_K_WEIGHT, HAS_ROPE, out_dtype)
            dst = k_out_ptr + out_row
        tl.store(dst + 2 * offs_j[None, :], even.to(out_dtype), mask=mask)
        tl.store(dst + 2 * offs_j[None, :] + 1, odd.to(out_dtype), mask=mask)
    offs_d = tl.arange(0, D)
    v = tl.load(v_ptr + b * sv_b + n * sv_n + h64 * sv_h + offs_d[None, :], mask=mask, other=0.0)
    tl.store(v_out_ptr + out_row + offs_d[None, :], v.to(out_dtype), mask=mask)


_launch = cached_launcher(_qk_norm_rope_kernel)


def qk_norm_rope(q, k, v, q_weight, k_weight, eps_q: float, eps_k: float, pe, out: tuple, offset: int) -> None:
    """Write rows ``offset .. offset + N`` of ``out = (q, k, v) [B, H, N_total, D]`` (contiguous) from ``q, k, v
    [B, N, H, D]`` (unit stride in D). ``pe``: ``[B or 1, 1, >= offset + N, D/2, 2, 2]`` float32, contiguous in its
    last three dimensions, or None (no rotation). KernelUnsupported for a head size that is not a power of two."""
    b, n, h, d = q.shape
    if d < 4 or d & (d - 1):
        raise KernelUnsupported(f"qk_norm_rope: head size {d} is not a power of two >= 4")
    q_out, k_out, v_out = out
    block_h = min(triton.next_power_of_2(h), 8)  # Flux's 24 heads: three programs per token, no idle lanes
    if b * n == 0:
        return
    rope = pe is not None
    spe_b = (pe.stride(0) if pe.shape[0] > 1 else 0) if rope else 0
    _launch((b * n, triton.cdiv(h, block_h)), q, k, v, q if q_weight is None else q_weight,
            k if k_weight is None else k_weight, pe if rope else q, q_out, k_out, v_out,
            n, h, offset, float(eps_q), float(eps_k),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), spe_b, pe.stride(2) if rope else 0,
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            D=d, BLOCK_H=block_h, HAS_Q_WEIGHT=q_weight is not None, HAS_K_WEIGHT=k_weight is not None,
            HAS_ROPE=rope, num_warps=4)
