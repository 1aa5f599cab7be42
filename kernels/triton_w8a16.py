"""Triton W8A16: float activations x int8 weight, for small M (a few hundred tokens or fewer).

At small M the matmul is memory bound: the time is reading the weight. An int8 weight is half the bytes
of a bf16 one, so the kernel reads int8 tiles, converts them to the activation dtype in registers
(exact: |q| <= 127) and runs a 16-bit MMA with float32 accumulation; the weight scale is applied to the
accumulator (per tile for block scales), never to a rounded bf16 weight. When too few output tiles
exist to keep every SM streaming, K is split across programs and the float32 partial sums are added in
a fixed order afterwards (deterministic, unlike atomics).

One activation row (M = 1, batch-1 LLM-style layers, adaLN modulation) takes a GEMV kernel instead: a
16-row MMA tile would be 15/16 padding, and 4-row weight tiles give thousands of programs that keep every
SM streaming. On the H100 it cut M = 1 from 1.07-1.31x bf16 to 1.49-1.66x (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .support import interpreting
from .configs import arch_of, cdiv, gemv_config, next_power_of_2, w8a16_candidates
from .launch import cached_launcher
from .triton_w8a8 import SCALE_BLOCK, _sm_count, block_k_for, scale_mode_of


@triton.jit
def _w8a16_kernel(
    x_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr,
    M, N, K, stride_xm, stride_bn, stride_cs, stride_cm, ws_stride_n, K_PER_SPLIT,
    SCALE_MODE: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_x = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k_start + offs_k)[None, :]
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + (k_start + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        if F32_DOT:
            # float32 inputs, and bf16 under Triton's CPU interpreter (3.9 computes bf16 dots and
            # int8 -> bf16 casts wrongly): an exact float32 dot of the same operands.
            part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, w.to(x.dtype))  # int8 -> 16-bit float is exact (|q| <= 127)
        if SCALE_MODE == 2:
            w_scale = tl.load(ws_ptr + rows_b * ws_stride_n + k0 // SCALE_BLOCK)
            acc += part * w_scale[None, :]
        else:
            acc += part
        x_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SCALE_MODE == 0:
        acc = acc * tl.load(ws_ptr)
    elif SCALE_MODE == 1:
        acc = acc * tl.load(ws_ptr + rows_b)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if not PARTIALS:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rows_b).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, b_ptr, c_ptr, ws_ptr, bias_ptr, N, K, stride_bn, ws_stride_n,
    SCALE_MODE: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One activation row (M = 1): no MMA (a 16-row tile would be 15/16 padding), products summed in
    float32 registers and reduced once at the end. Narrow N tiles give many programs, so the weight
    streams from every SM at once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # out-of-range rows re-read a valid one; the store is masked
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = b_ptr + rows[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + offs_k)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - k0
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0)
        part = w.to(tl.float32) * x.to(tl.float32)[None, :]  # exact for bf16/fp16 x (|q| <= 127), one rounding for fp32
        if SCALE_MODE == 2:
            acc += part * tl.load(ws_ptr + rows * ws_stride_n + k0 // SCALE_BLOCK)[:, None]
        else:
            acc += part
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if SCALE_MODE == 0:
        y = y * tl.load(ws_ptr)
    elif SCALE_MODE == 1:
        y = y * tl.load(ws_ptr + rows)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(c_ptr + offs_n, y.to(c_ptr.dtype.element_ty), mask=offs_n < N)


# At or below this M the GEMV kernel runs (benchmarks set it to 0 to time the tiled kernel at M = 1).
GEMV_MAX_M = 1

_launch_w8a16 = cached_launcher(_w8a16_kernel)
_launch_gemv = cached_launcher(_w8a16_gemv_kernel)


def w8a16_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int = 128,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] int8 * weight_scale).T + bias`` -> ``[M, N]`` in ``x.dtype``."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("w8a16_matmul needs rows with unit stride")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"w8a16_matmul: out must be a contiguous {x.dtype} tensor of shape {(m, n)}")
    if m == 0 or n == 0:
        return out
    mode = scale_mode_of(weight_scale)
    ws = weight_scale.contiguous()
    ws_stride = ws.stride(0) if mode == SCALE_BLOCK else 0
    bias_arg = bias.contiguous() if bias is not None else ws
    if m <= GEMV_MAX_M and split_k is None and k > 0:
        gemv = gemv_config(arch_of(x.device))
        block_k = gemv.block_k if mode != SCALE_BLOCK else block_k_for(gemv.block_k, block_size)
        _launch_gemv((cdiv(n, gemv.block_n),), x, weight, out, ws, bias_arg, n, k, weight.stride(0), ws_stride,
                     SCALE_MODE=mode, SCALE_BLOCK=block_size, HAS_BIAS=bias is not None, BLOCK_N=gemv.block_n,
                     BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=gemv.num_warps, num_stages=gemv.num_stages)
        return out
    candidates = w8a16_candidates(arch_of(x.device))
    cfg = candidates[0] if m <= 16 or len(candidates) == 1 else candidates[1]
    block_m = max(16, min(cfg.block_m, next_power_of_2(m)))
    if m > cfg.block_m:
        block_m = min(64, next_power_of_2(m))
    block_k = cfg.block_k if mode != SCALE_BLOCK else block_k_for(cfg.block_k, block_size)
    tiles = cdiv(m, block_m) * cdiv(n, cfg.block_n)
    k_tiles = max(1, cdiv(k, block_k))
    if split_k is None:
        # Split K only when the output tiles would leave over half the SMs idle (the partial sums cost
        # extra launches); each split keeps >= 4 K tiles to pipeline.
        sms = _sm_count(x.device)
        split_k = 1 if 2 * tiles >= sms else max(1, min(cdiv(sms, tiles), k_tiles // 4))
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = cdiv(k_tiles, split_k) * block_k
    split_k = cdiv(max(k, 1), k_per_split)
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    stride_cs = 0 if split_k == 1 else target.stride(0)
    grid = (cdiv(n, cfg.block_n), cdiv(m, block_m), split_k)
    _launch_w8a16(
        grid, x, weight, target, ws, bias_arg, m, n, k, x.stride(0), weight.stride(0), stride_cs, n, ws_stride,
        k_per_split, SCALE_MODE=mode, SCALE_BLOCK=block_size, HAS_BIAS=bias is not None, PARTIALS=split_k > 1,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, F32_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split_k > 1:
        summed = target.sum(dim=0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)
    return out
