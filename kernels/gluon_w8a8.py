"""Hopper W8A8 GEMM in Gluon: warp-specialized (one loader warp, two MMA warpgroups).

Why a second W8A8 kernel: the Triton kernel (``triton_w8a8._w8a8_tma_kernel``, the same 128x256x128 tile)
reaches about 1000-1200 int8 TOPS on the H100. Triton 3.6 cannot warp-specialize on Hopper (its
``tl.range(warp_specialize=True)`` serves Blackwell only), so its warps load, wait and multiply in turn.
Here the roles are split, which Gluon (Triton's lower-level language, ``triton.experimental.gluon``)
lets us write directly:

* one loader warp issues the TMA loads of A (one 64-row box per consumer) and B into a ring of
  ``STAGES`` shared-memory buffers, as soon as both consumers have released a stage;
* two consumer warpgroups (4 warps each) own 64 rows of the 128-row tile each, and all BLOCK_N (256 or 128)
  columns as two 64 x BLOCK_N/2 int32 accumulators. Each waits for a stage, issues its async
  ``warpgroup_mma`` and releases the previous stage once the new MMAs are in flight; then writes its 64 rows
  of C in two halves (``acc * a_scale[m] * w_scale(n) + bias``, cast, TMA store). Two halves, because the
  scales and bias of a whole 256-column row would not fit in the registers next to the accumulator.

Tiles are walked persistently (one program per SM) in grouped order. Tensorwise and rowwise weight scales,
bf16/fp16 output; block scales and float32 output stay on the Triton kernel.

On the H100 (bench/kernels.py, docs/PERFORMANCE.md) this reaches 1300-1500 TOPS, 1.2-1.3x the Triton
kernel. A 192-row tile (three consumer warpgroups, fewer bytes per multiply-add) was measured slower:
at 160 registers per thread its epilogue spills.

Gluon has no interpreter: this kernel is tested on the GPU, and compiled for sm90 on the CPU in CI.
"""

from __future__ import annotations

import torch

try:  # Gluon arrived in triton 3.4; older tritons keep the Triton kernel.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

from .support import KernelUnsupported
from .configs import cdiv
from .launch import cached_launcher

WG_ROWS = 64  # rows of the tile each consumer warpgroup owns (one m64 wgmma row block)
NUM_CONSUMERS = 2
BLOCK_M = WG_ROWS * NUM_CONSUMERS
OUT_DTYPES = (torch.bfloat16, torch.float16)

# Registers per thread. The kernel runs 3 warpgroups (2 consumers, and the loader warp padded to one); 64 K
# registers over 384 threads is 168 at launch, then the loader gives back all but 24 and the consumers take
# 232 (``setmaxnreg``). ptxas 13 (triton 3.9) spills nothing; ptxas 12.8 (triton 3.6) ~48 bytes of epilogue
# addresses when there is a bias (tests/test_gluon_w8a8.py bounds it).
LAUNCH_REGS = 168
CONSUMER_REGS = 232
LOADER_REGS = 24


if HAVE_GLUON:
    _ROWS = gl.constexpr(WG_ROWS)
    # triton 3.6 names the TMA copies async_copy_*; later ones async_load/async_store (same arguments).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """Grouped ordering: GROUP_M row tiles share each column tile of B while it is in L2."""
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = gl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @gluon.jit
    def _load_partition(a_desc, b_desc, a_bufs, b_bufs, ready_bars, empty_bars, M, N, K, GROUP_M: gl.constexpr):
        """One warp: fill stage s with one A box per consumer and one B box, once both consumers released it."""
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = b_desc.block_type.shape[1]
        STAGES: gl.constexpr = b_bufs.type.shape[0]
        STAGE_BYTES: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        num_pid_m = gl.cdiv(M, 2 * _ROWS)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        count = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * 2 * _ROWS
            off_n = pid_n * BLOCK_N
            for ki in range(k_tiles):
                stage = count % STAGES
                # A fresh barrier counts as having completed the phase before 0: the first lap does not wait.
                mbarrier.wait(empty_bars.index(stage), ((count // STAGES) & 1) ^ 1)
                bar = ready_bars.index(stage)
                mbarrier.expect(bar, STAGE_BYTES)  # out-of-bounds parts of a box arrive as zeros, and count
                _tma_load(a_desc, [off_m, ki * BLOCK_K], bar, a_bufs.index(2 * stage))
                _tma_load(a_desc, [off_m + _ROWS, ki * BLOCK_K], bar, a_bufs.index(2 * stage + 1))
                _tma_load(b_desc, [off_n, ki * BLOCK_K], bar, b_bufs.index(stage))
                count += 1

    @gluon.jit
    def _epilogue_half(acc, acc_layout: gl.constexpr, c_desc, c_smem, as_ptr, ws_ptr, bias_ptr, off_m, off_n, M, N,
                       SCALE_MODE: gl.constexpr, HAS_BIAS: gl.constexpr):
        """``acc * a_scale[m] * w_scale(n) + bias`` for a 64 x 128 half tile, stored through c_smem by TMA."""
        offs_m = off_m + gl.arange(0, c_desc.block_type.shape[0], layout=gl.SliceLayout(1, acc_layout))
        offs_n = off_n + gl.arange(0, c_desc.block_type.shape[1], layout=gl.SliceLayout(0, acc_layout))
        out = acc.to(gl.float32) * gl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        if SCALE_MODE == 0:
            out = out * gl.load(ws_ptr)
        else:
            out = out * gl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if HAS_BIAS:
            out = out + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
        tma.store_wait(0)  # the previous store from c_smem has finished reading it
        c_smem.store(out.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, off_n], c_smem)  # rows/columns past M/N are clipped

    @gluon.jit
    def _mma_partition(a_bufs, b_bufs, ready_bars, empty_bars, c_desc, c_smem, as_ptr, ws_ptr, bias_ptr,
                       M, N, K, WG: gl.constexpr, GROUP_M: gl.constexpr,
                       SCALE_MODE: gl.constexpr, HAS_BIAS: gl.constexpr):
        """One consumer warpgroup: rows [WG * 64, WG * 64 + 64) of every tile, all BLOCK_N columns."""
        BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
        HALF_N: gl.constexpr = BLOCK_N // 2
        BLOCK_K: gl.constexpr = b_bufs.type.shape[2]
        STAGES: gl.constexpr = b_bufs.type.shape[0]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HALF_N, 32])
        num_pid_m = gl.cdiv(M, 2 * _ROWS)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        acc_lo = gl.zeros((_ROWS, HALF_N), dtype=gl.int32, layout=acc_layout)
        acc_hi = gl.zeros((_ROWS, HALF_N), dtype=gl.int32, layout=acc_layout)
        count = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * 2 * _ROWS + WG * _ROWS
            off_n = pid_n * BLOCK_N
            for ki in range(k_tiles):
                stage = count % STAGES
                mbarrier.wait(ready_bars.index(stage), (count // STAGES) & 1)
                a = a_bufs.index(2 * stage + WG)
                b = b_bufs.index(stage)
                acc_lo = warpgroup_mma(a, b.slice(0, HALF_N, dim=0).permute((1, 0)), acc_lo, use_acc=ki > 0,
                                       is_async=True)
                acc_hi = warpgroup_mma(a, b.slice(HALF_N, HALF_N, dim=0).permute((1, 0)), acc_hi, use_acc=ki > 0,
                                       is_async=True)
                # Keep this step's two MMAs in flight; the previous step's are done reading their stage.
                acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=2, deps=(acc_lo, acc_hi))
                mbarrier.arrive(empty_bars.index((count + STAGES - 1) % STAGES), count=1, pred=ki > 0)
                count += 1
            acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
            mbarrier.arrive(empty_bars.index((count + STAGES - 1) % STAGES), count=1)
            _epilogue_half(acc_lo, acc_layout, c_desc, c_smem, as_ptr, ws_ptr, bias_ptr, off_m, off_n, M, N,
                           SCALE_MODE, HAS_BIAS)
            _epilogue_half(acc_hi, acc_layout, c_desc, c_smem, as_ptr, ws_ptr, bias_ptr, off_m, off_n + HALF_N, M, N,
                           SCALE_MODE, HAS_BIAS)
        tma.store_wait(0)

    @gluon.jit
    def _w8a8_ws_kernel(a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, bias_ptr, M, N, K,
                        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                        SCALE_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        LOADER_REGS: gl.constexpr):
        # Tensor descriptors made on the device (in scratch from ``triton.set_allocator``): the host passes plain
        # pointers, so a launch encodes no descriptor on the CPU.
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_ROWS, BLOCK_K], gl.int8)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8)
        c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_ROWS, BLOCK_N // 2], c_ptr.dtype.element_ty)
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [_ROWS, BLOCK_K], a_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [K, 1], [BLOCK_N, BLOCK_K], b_layout)
        c_desc = tma.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [_ROWS, BLOCK_N // 2], c_layout)
        a_bufs = gl.allocate_shared_memory(gl.int8, [2 * STAGES, _ROWS, BLOCK_K], a_layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], b_layout)
        c_bufs = gl.allocate_shared_memory(c_ptr.dtype.element_ty, [2, _ROWS, BLOCK_N // 2], c_layout)
        ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_bars.index(i), count=1)
            mbarrier.init(empty_bars.index(i), count=2)  # both consumers release the stage
        WG0: gl.constexpr = 0  # warpgroup indices reach the partitions as constexprs
        WG1: gl.constexpr = 1
        gl.warp_specialize([
            (_mma_partition, (a_bufs, b_bufs, ready_bars, empty_bars, c_desc, c_bufs.index(0), as_ptr, ws_ptr,
                              bias_ptr, M, N, K, WG0, GROUP_M, SCALE_MODE, HAS_BIAS)),
            (_mma_partition, (a_bufs, b_bufs, ready_bars, empty_bars, c_desc, c_bufs.index(1), as_ptr, ws_ptr,
                              bias_ptr, M, N, K, WG1, GROUP_M, SCALE_MODE, HAS_BIAS)),
            (_load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready_bars, empty_bars, M, N, K, GROUP_M)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])

    _launch = cached_launcher(_w8a8_ws_kernel)


def supports(m: int, n: int, k: int, out_dtype: torch.dtype, scale_mode: int) -> bool:
    """Shapes and formats this kernel takes (the caller checks the GPU, alignment and contiguity):
    TMA needs 16-byte row strides (K % 16, N % 8 for 2-byte outputs)."""
    return (HAVE_GLUON and scale_mode in (0, 1) and out_dtype in OUT_DTYPES and k % 16 == 0 and n % 8 == 0
            and m > 0 and n > 0 and k > 0)


def kernel_args(qa, a_scale, weight, weight_scale, bias, out, block_n: int, block_k: int, stages: int, group_m: int,
                num_sms: int):
    """(grid, runtime args, constexpr kwargs) of one launch: shared by the launcher and the sm90 compile test."""
    m, k = qa.shape
    n = weight.shape[0]
    tiles = cdiv(m, BLOCK_M) * cdiv(n, block_n)
    args = (qa, weight, out, a_scale, weight_scale, bias if bias is not None else weight_scale, m, n, k)
    constexprs = dict(BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, GROUP_M=group_m,
                      SCALE_MODE=0 if weight_scale.numel() == 1 else 1, HAS_BIAS=bias is not None,
                      CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS)
    return (min(num_sms, tiles),), args, constexprs


def w8a8_ws_matmul(qa, a_scale, weight, weight_scale, bias, out, config, num_sms: int):
    """``out = (qa * a_scale) @ (weight * weight_scale).T + bias`` on sm90; ``config`` is a
    ``configs.GemmConfig`` whose block_m is 128 (two 64-row consumers). Operands contiguous and 16-byte aligned,
    ``triton.set_allocator`` set (``triton_w8a8`` does both)."""
    if not HAVE_GLUON:
        raise KernelUnsupported("this triton has no Gluon (triton.experimental.gluon)")
    grid, args, kwargs = launch_args(qa, a_scale, weight, weight_scale, bias, out, config, num_sms)
    return _launch(grid, *args, **kwargs)


def launch_args(qa, a_scale, weight, weight_scale, bias, out, config, num_sms: int):
    """(grid, runtime args, keyword args incl. launch options) of one launch: shared by
    :func:`w8a8_ws_matmul` and the launch plans (:mod:`.plans`)."""
    grid, args, constexprs = kernel_args(qa, a_scale, weight, weight_scale, bias, out, config.block_n,
                                         config.block_k, config.num_stages, config.group_m, num_sms)
    return grid, args, dict(constexprs, num_warps=4, maxnreg=LAUNCH_REGS)
