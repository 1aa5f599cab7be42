"""Triton W8A8 GEMM: int8 activations x int8 weight ``[N, K]`` -> int32 -> scaled output.

Two kernels compute the same function:

* ``_w8a8_tma_kernel`` (sm90+): persistent grid (one program per SM walking tiles in grouped order),
  tensor descriptors (TMA) for A, B and C, wgmma through ``tl.dot``; needs 16-byte aligned rows.
* ``_w8a8_kernel``: plain pointer loads with masks; every other GPU, odd shapes, the interpreter.

Epilogue (both): ``out = acc * a_scale[m] * w_scale(n) + bias[n]`` in float32, cast to the output dtype.
Scale modes: 0 tensorwise (scalar), 1 rowwise (``[N]``), 2 block (``[N, ceil(K / SCALE_BLOCK)]``), where
each K tile's int32 partial product is scaled inside the K loop (a K tile never straddles two blocks).
The weight is read in its ``nn.Linear`` layout: no transpose copy.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from . import gluon_w8a8
from .support import KernelUnsupported
from .launch import cached_launcher
from .configs import (BLOCK_SCALE_USES_SMALLER_TILE, GemmConfig, arch_of, cdiv, int8_mma_supported, pick_ws_config,
                      set_gluon, tma_allowed, w8a8_candidates, ws_candidates)

log = logging.getLogger("comfyui_headroom.kernels")

SCALE_TENSORWISE, SCALE_ROWWISE, SCALE_BLOCK = 0, 1, 2

# The last compiled kernel of each variant ("gluon", "tma", "pointer"): lets tests/benchmarks read its PTX/SASS.
LAST_COMPILED: dict = {}


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles share each column of B while it is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, as_ptr, ws_ptr, bias_ptr, offs_m, offs_n, M, N,
              SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    a_scale = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None]
    if SCALE_MODE == 0:
        out = out * tl.load(ws_ptr)
    elif SCALE_MODE == 1:
        out = out * tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _w8a8_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr,
    M, N, K, stride_am, stride_bn, stride_cm, ws_stride_n,
    SCALE_MODE: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns re-read a valid row (wrapped): loads need no M/N mask, stores are masked.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]
    if SCALE_MODE == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        if SCALE_MODE == 2:
            part = tl.dot(a, b, out_dtype=tl.int32)
            w_scale = tl.load(ws_ptr + rows_b * ws_stride_n + k0 // SCALE_BLOCK)
            acc += part.to(tl.float32) * w_scale[None, :]
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out = _epilogue(acc, as_ptr, ws_ptr, bias_ptr, offs_m, offs_n, M, N, SCALE_MODE, HAS_BIAS)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _w8a8_tma_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr,
    M, N, K, ws_stride_n,
    SCALE_MODE: tl.constexpr, SCALE_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    # The epilogue recomputes its tile from its own counter so the flattened loop can overlap the
    # next tile's loads with this tile's epilogue.
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SCALE_MODE == 2:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            rows_b = off_n + tl.arange(0, BLOCK_N)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            b = b_desc.load([off_n, off_k])
            if SCALE_MODE == 2:
                part = tl.dot(a, b.T, out_dtype=tl.int32)
                w_scale = tl.load(ws_ptr + rows_b * ws_stride_n + off_k // SCALE_BLOCK, mask=rows_b < N, other=0.0)
                acc += part.to(tl.float32) * w_scale[None, :]
            else:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out = _epilogue(acc, as_ptr, ws_ptr, bias_ptr, offs_m, offs_n, M, N, SCALE_MODE, HAS_BIAS)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(c_ptr.dtype.element_ty))


_launch_pointer = cached_launcher(_w8a8_kernel)
_launch_tma = cached_launcher(_w8a8_tma_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a handful of "SMs" so the persistent loop takes several tiles each
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


_allocator_set = False


_scratch: dict = {}


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Scratch for device-side tensor descriptors (a few hundred bytes per program), reused per
    (device, stream): kernels on one stream run in order, so the next launch may overwrite it. Saves an
    allocation per W8A8 call. Fresh memory while a CUDA graph is being captured (the graph owns it)."""
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, device="cuda", dtype=torch.int8)
    key = (torch.cuda.current_device(), stream)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < size:
        buf = _scratch[key] = torch.empty(max(size, 64 * 1024), device="cuda", dtype=torch.int8)
    return buf


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from the caller (``triton.set_allocator``)."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(_descriptor_scratch)
        _allocator_set = True


def scale_mode_of(weight_scale: torch.Tensor) -> int:
    if weight_scale.numel() == 1 and weight_scale.ndim <= 1:
        return SCALE_TENSORWISE
    if weight_scale.ndim == 1:
        return SCALE_ROWWISE
    return SCALE_BLOCK


def block_k_for(config_block_k: int, scale_block: int) -> int:
    """Largest power-of-two K tile <= the config's that divides the scale block (so no tile straddles two)."""
    bk = config_block_k
    while bk >= 16 and scale_block % bk:
        bk //= 2
    if bk < 16:
        raise KernelUnsupported(f"block size {scale_block} has no power-of-two K tile >= 16 dividing it")
    return bk


def _aligned_16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _pick_config(device: torch.device, m: int, n: int, k: int, out: torch.Tensor, tensors,
                 block_scales: bool = False) -> GemmConfig:
    arch = arch_of(device)
    candidates = w8a8_candidates(arch)
    cfg = candidates[0]
    if block_scales and arch in BLOCK_SCALE_USES_SMALLER_TILE and len(candidates) > 1:
        cfg = candidates[1]
    elif len(candidates) > 1 and cfg.tma:
        tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
        if tiles < _sm_count(device):  # big tiles would leave SMs idle: take the smaller tile
            cfg = candidates[1]
    if cfg.tma:
        tma_ok = (
            tma_allowed(arch)
            and k % 16 == 0
            and (n * out.element_size()) % 16 == 0
            and all(_aligned_16(t) and t.is_contiguous() for t in tensors)
        )
        if not tma_ok:
            # Same tile, pointer kernel (odd K, unaligned views).
            cfg = GemmConfig(cfg.block_m, min(cfg.block_n, 128), min(cfg.block_k, 64), cfg.group_m, cfg.num_warps, 3)
    return cfg


def _gluon_failed(err: Exception) -> None:
    """The Gluon kernel could not run here: say so once and use the Triton kernel for the rest of the process."""
    set_gluon(False)
    log.warning(
        "headroom: the Gluon W8A8 kernel failed (%s: %s); using the Triton W8A8 kernel from now on "
        "(set HEADROOM_GLUON=0 to skip the attempt)", type(err).__name__, str(err).splitlines()[0] if str(err) else "")


def _gluon_config(device: torch.device, m: int, n: int, k: int, out: torch.Tensor, mode: int, tensors):
    """The warp-specialized Gluon kernel's tile for this call (Hopper, its formats, 16-byte aligned contiguous
    operands), else None: the Triton kernels take the call. On the H100 it beat the Triton kernel at every
    M >= 256 measured (bench/results/gluon_small_m.json)."""
    candidates = ws_candidates(arch_of(device))
    if not candidates or not gluon_w8a8.supports(m, n, k, out.dtype, mode):
        return None
    if not all(_aligned_16(t) and t.is_contiguous() for t in tensors):
        return None
    return pick_ws_config(candidates, m, n, _sm_count(device))


def w8a8_matmul(
    qa: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block_size: int = 128,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(qa [M, K] int8 * a_scale [M]) @ (weight [N, K] int8 * weight_scale).T + bias`` -> ``[M, N] out_dtype``."""
    m, k = qa.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"w8a8_matmul: out must be a contiguous {out_dtype} tensor of shape {(m, n)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_().add_(bias.to(out_dtype)) if bias is not None else out.zero_()
    if not int8_mma_supported(qa.device):
        raise KernelUnsupported("Triton int8 matmul needs sm80 or newer")
    mode = scale_mode_of(weight_scale)
    ws = weight_scale.contiguous()
    ws_stride = ws.stride(0) if mode == SCALE_BLOCK else 0
    bias = bias.contiguous() if bias is not None else None
    ws_cfg = _gluon_config(qa.device, m, n, k, out, mode, (qa, weight, out))
    if ws_cfg is not None:
        _ensure_allocator()  # scratch for the kernel's device-side tensor descriptors
        try:
            LAST_COMPILED["gluon"] = gluon_w8a8.w8a8_ws_matmul(qa, a_scale, weight, ws, bias, out, ws_cfg,
                                                               _sm_count(qa.device))
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a triton whose Gluon differs from the 3.6/3.9 we test
            _gluon_failed(err)  # the Triton kernel below computes the same thing
    bias_arg = bias if bias is not None else ws  # dummy pointer when HAS_BIAS is False
    cfg = _pick_config(qa.device, m, n, k, out, (qa, weight, out), block_scales=mode == SCALE_BLOCK)
    block_k = cfg.block_k if mode != SCALE_BLOCK else block_k_for(cfg.block_k, block_size)
    common = dict(SCALE_MODE=mode, SCALE_BLOCK=block_size, HAS_BIAS=bias is not None,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.tma:
        if qa.is_cuda:
            _ensure_allocator()
        sms = _sm_count(qa.device)
        tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
        grid = (min(sms, tiles),)  # NUM_SMS stays the SM count so the compiled kernel does not vary with M
        LAST_COMPILED["tma"] = _launch_tma(
            grid, qa, weight, out, a_scale, ws, bias_arg, m, n, k, ws_stride, NUM_SMS=sms, **common)
    else:
        if weight.stride(1) != 1 or qa.stride(1) != 1:
            raise KernelUnsupported("W8A8 needs rows with unit stride")
        grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
        LAST_COMPILED["pointer"] = _launch_pointer(grid, qa, weight, out, a_scale, ws, bias_arg, m, n, k, qa.stride(0), weight.stride(0),
                           out.stride(0), ws_stride, EVEN_K=(k % block_k == 0), **common)
    return out
