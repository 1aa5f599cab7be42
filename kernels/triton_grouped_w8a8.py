"""Triton kernels of a Mixture-of-Experts layer in W8A8: the grouped GEMM over all experts, and the SwiGLU gate
that writes the second GEMM's input in INT8.

Why one launch for all experts: HunyuanImage-3 routes each token to 8 of 64 experts, so a layer's rows split into
64 uneven groups of ~500-2000 rows. A loop of 64 GEMMs pays 64 launches and leaves the GPU half idle at the tail of
every small one; a grouped GEMM is one grid over every expert's tiles.

* :func:`grouped_w8a8_matmul` - ``out[m] = (qa[src(m)] . weight[e]) * a_scale[src(m)] * weight_scale[e]`` for the
  output rows ``m`` in ``offsets[e]:offsets[e + 1]``, with ``src(m) = row_index[m]`` (the gather happens inside
  the kernel, so the first GEMM reads each token's INT8 row once per chosen expert without a gathered copy) or
  ``m``. int32 accumulation, the scales in the float32 epilogue (the order of ``kernels/triton_w8a8.py``).
* :func:`silu_gate_quantize` - ``h [M, 2I]`` -> per-row INT8 of ``h[:, :I] * silu(h[:, I:])`` (HunyuanImage-3's
  order: the SECOND half goes through SiLU), the quantization of :mod:`.triton_quant`; reads ``h`` once.

No host synchronisation: the counts per expert live on the GPU, so the tile schedule is computed there with a
few torch ops (:func:`tile_schedule`) and the grid is its upper bound, ``cdiv(M_out, BLOCK_M) + E`` row tiles
times the column tiles (each expert wastes at most one partial tile). Programs past the real tile count return
at once. The weight is read in its ``nn.Linear`` layout per expert: no transpose copy.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .configs import GemmConfig, arch_of, cdiv, int8_mma_supported, tma_allowed
from .launch import cached_launcher
from .support import KernelUnsupported
from .triton_quant import _quantize_value, _row_scale, row_block
from .triton_w8a8 import _ensure_allocator, _sm_count, _tile_coords

G = GemmConfig

# Tiles per architecture, largest rows first; :func:`pick_config` takes the largest whose rows an average expert
# fills several times over. Hopper: the persistent TMA kernel with 128 x 256 x 128 tiles, then 64-row tiles for
# experts with few rows (half-empty 128-row tiles would waste the MMA). Measured on the H200 at HunyuanImage-3's
# expert shapes (bench/grouped_moe_gemm.py --sweep, 2026-12-04): TMA 128x256x128 (group 16, 3 stages) 1.99 / 1.16 ms
# for gate_and_up / down at 4096 tokens vs 2.30 / 1.40 ms for the same tile with pointer loads; 6.4 / 3.3 ms vs
# 7.3 / 4.0 ms at 16384 tokens.
GROUPED_CONFIGS: dict[str, list[GemmConfig]] = {
    "sm90": [G(128, 256, 128, 16, 8, 3, tma=True), G(64, 256, 128, 8, 4, 4, tma=True), G(64, 128, 128, 8, 4, 4)],
    "sm100": [G(128, 256, 128, 8, 8, 3), G(128, 128, 128, 8, 8, 4), G(64, 128, 128, 8, 4, 4)],
    "sm120": [G(128, 128, 64, 8, 8, 3), G(64, 128, 64, 8, 4, 3)],
    "sm80": [G(128, 128, 64, 8, 8, 4), G(64, 128, 64, 8, 4, 4)],
    "sm86": [G(128, 128, 64, 8, 8, 3), G(64, 128, 64, 8, 4, 3)],
    "sm89": [G(128, 128, 64, 8, 8, 3), G(64, 128, 64, 8, 4, 3)],
    "fallback": [G(64, 64, 32, 8, 4, 2)],
}
# An expert's last tile is on average half empty: a tile whose rows are at most this fraction of the average
# expert's wastes at most ~1/8 of the MMA work on padding.
ROWS_PER_TILE_FILL = 4

_override: list[GemmConfig] = []


@contextlib.contextmanager
def override(config: GemmConfig):
    """Use ``config`` for every grouped GEMM inside the block (tiny tiles for the interpreter, tuning)."""
    _override.append(config)
    try:
        yield
    finally:
        _override.pop()


def pick_config(device: torch.device, m_out: int, num_experts: int) -> GemmConfig:
    """The tile for this call, from host integers only (no look at the counts on the GPU): the largest tile whose
    ``block_m`` is at most 1/ROWS_PER_TILE_FILL of the average rows per expert, else the smallest."""
    if _override:
        return _override[-1]
    candidates = GROUPED_CONFIGS.get(arch_of(device), GROUPED_CONFIGS["fallback"])
    average_rows = m_out / max(num_experts, 1)
    for cfg in candidates:
        if cfg.block_m * ROWS_PER_TILE_FILL <= average_rows:
            return cfg
    return candidates[-1]


def tile_schedule(group_offsets: torch.Tensor, m_out: int, block_m: int) -> tuple[torch.Tensor, int]:
    """``(schedule int32 [2, bound], bound)``: for row tile ``t``, ``schedule[0, t]`` is its expert (-1 past the
    real tiles) and ``schedule[1, t]`` its first output row; ``bound = cdiv(m_out, block_m) + E`` is what the grid
    is sized by. Torch ops on ``group_offsets``' device, no synchronisation: tiles per expert
    ``ceil(count / block_m)``, their running sum, and ``searchsorted`` of every tile index in it.
    Offsets that go down give their expert no tiles instead of a negative count."""
    num_experts = group_offsets.numel() - 1
    bound = cdiv(m_out, block_m) + num_experts
    offsets = group_offsets.to(torch.int64)
    counts = (offsets[1:] - offsets[:-1]).clamp_(min=0)
    tiles = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")
    tile_ends = torch.cumsum(tiles, 0)
    tile_ids = torch.arange(bound, device=group_offsets.device)
    expert = torch.searchsorted(tile_ends, tile_ids, right=True)  # E for the tiles past the last
    real = expert < num_experts
    expert = expert.clamp_(max=num_experts - 1)
    first_tile = tile_ends[expert] - tiles[expert]
    first_row = offsets[expert] + (tile_ids - first_tile) * block_m
    schedule = torch.stack((torch.where(real, expert, -1), first_row)).to(torch.int32)
    return schedule, bound


@triton.jit
def _grouped_w8a8_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, offsets_ptr, schedule_ptr, row_index_ptr, out_index_ptr,
    M_OUT, N, K, num_row_tiles, stride_am, stride_be, stride_bn, stride_cm, stride_wse,
    HAS_ROW_INDEX: tl.constexpr, HAS_OUT_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M consecutive row tiles (mostly of one expert) share each column tile of its weight while in L2.
    tile, pid_n = _tile_coords(pid, num_row_tiles, num_pid_n, GROUP_M)
    expert = tl.load(schedule_ptr + tile)
    if expert < 0:
        return  # past the real tiles: the grid is an upper bound
    first_row = tl.load(schedule_ptr + num_row_tiles + tile)
    group_end = tl.minimum(tl.load(offsets_ptr + expert + 1).to(tl.int64), M_OUT)
    offs_m = first_row.to(tl.int64) + tl.arange(0, BLOCK_M)
    # Rows past the group's end re-read its last row (loads need no row mask); their stores are masked.
    rows = tl.minimum(offs_m, group_end - 1)
    if HAS_ROW_INDEX:
        src_rows = tl.load(row_index_ptr + rows).to(tl.int64)
    else:
        src_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)  # columns past N re-read a valid one; stores masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(as_ptr + src_rows)
    w_scale = tl.load(ws_ptr + expert.to(tl.int64) * stride_wse + cols)
    out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_OUT_INDEX:
        dst_rows = tl.load(out_index_ptr + rows).to(tl.int64)  # rows past the group end: masked below
    else:
        dst_rows = offs_m
    c_ptrs = c_ptr + dst_rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < group_end) & (offs_n[None, :] < N))


@triton.jit
def _grouped_w8a8_tma_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, ws_ptr, offsets_ptr, schedule_ptr, out_index_ptr,
    M_OUT, N, K, num_row_tiles, num_experts, stride_cm, stride_wse,
    HAS_OUT_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """Hopper: a persistent grid (one program per SM walking the tiles) with tensor descriptors (TMA) for the
    activation rows (already in expert order: gathered beforehand) and for the weights seen as ``[E * N, K]``.
    A tile's rows past its group's end read the next group's rows (or TMA's zero fill): their stores are masked,
    which is also why C is stored through pointers, not a descriptor."""
    start_pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_row_tiles * num_pid_n
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M_OUT, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[num_experts * N, K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS):
        tile, pid_n = _tile_coords(tile_id, num_row_tiles, num_pid_n, GROUP_M)
        expert = tl.load(schedule_ptr + tile)
        if expert >= 0:
            first_row = tl.load(schedule_ptr + num_row_tiles + tile)
            group_end = tl.minimum(tl.load(offsets_ptr + expert + 1), M_OUT)
            off_n = pid_n * BLOCK_N
            row_b = expert * N + off_n
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in range(k_tiles):
                a = a_desc.load([first_row, ki * BLOCK_K])
                b = b_desc.load([row_b, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            offs_m = first_row.to(tl.int64) + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            row_ok = offs_m < group_end
            a_scale = tl.load(as_ptr + offs_m, mask=row_ok, other=0.0)
            w_scale = tl.load(ws_ptr + expert.to(tl.int64) * stride_wse + offs_n, mask=offs_n < N, other=0.0)
            out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
            if HAS_OUT_INDEX:
                dst_rows = tl.load(out_index_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
            else:
                dst_rows = offs_m
            c_ptrs = c_ptr + dst_rows[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


_launch_grouped = cached_launcher(_grouped_w8a8_kernel)
_launch_grouped_tma = cached_launcher(_grouped_w8a8_tma_kernel)

# The last compiled grouped kernel (tests and benchmarks read its PTX/SASS, as triton_w8a8.LAST_COMPILED).
LAST_COMPILED: dict = {}


def grouped_w8a8_matmul(
    qa: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    group_offsets: torch.Tensor,
    row_index: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
    out_row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped W8A8 GEMM, one launch. Arguments as :func:`comfyui_headroom.kernels.grouped.grouped_int8_linear`
    (which checks them); ``config`` overrides the tile. Raises :class:`KernelUnsupported` where the kernel cannot
    run (int8 MMA needs sm80+; rows must have unit stride)."""
    m_out = row_index.shape[0] if row_index is not None else qa.shape[0]
    num_experts, n, k = weight.shape
    out = torch.empty((m_out, n), dtype=out_dtype, device=qa.device)
    if m_out == 0 or n == 0:
        return out
    if k == 0 or num_experts == 0:
        return out.zero_()  # (no experts: valid offsets leave no rows, see grouped.py)
    if not int8_mma_supported(qa.device):
        raise KernelUnsupported("Triton int8 matmul needs sm80 or newer")
    if qa.stride(1) != 1 or weight.stride(2) != 1:
        raise KernelUnsupported("the grouped W8A8 GEMM needs rows with unit stride")
    if m_out >= 2**31 - 1:
        raise KernelUnsupported("the tile schedule holds rows in int32")
    cfg = config or pick_config(qa.device, m_out, num_experts)
    schedule, bound = tile_schedule(group_offsets, m_out, cfg.block_m)
    if cfg.tma and _tma_fits(qa, weight, k):
        return _grouped_tma(qa, a_scale, weight, weight_scale, group_offsets, row_index, out, cfg, schedule, bound,
                            out_row_index)
    ws = weight_scale if weight_scale.stride(1) == 1 else weight_scale.contiguous()
    offsets = group_offsets.contiguous()
    index = row_index.contiguous() if row_index is not None else offsets  # dummy pointer when unused
    out_index = out_row_index.contiguous() if out_row_index is not None else offsets
    grid = (bound * cdiv(n, cfg.block_n),)
    LAST_COMPILED["grouped"] = _launch_grouped(
        grid, qa, weight, out, a_scale.contiguous(), ws, offsets, schedule, index, out_index,
        m_out, n, k, bound, qa.stride(0), weight.stride(0), weight.stride(1), out.stride(0), ws.stride(0),
        HAS_ROW_INDEX=row_index is not None, HAS_OUT_INDEX=out_row_index is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _tma_fits(qa: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    """Tensor descriptors need sm90+, 16-byte rows and bases, and contiguous operands."""
    return (qa.is_cuda and tma_allowed(arch_of(qa.device)) and k % 16 == 0 and weight.is_contiguous()
            and weight.data_ptr() % 16 == 0 and qa.data_ptr() % 16 == 0)


def _grouped_tma(qa, a_scale, weight, weight_scale, group_offsets, row_index, out, cfg, schedule, bound,
                 out_row_index=None):
    """The persistent TMA kernel; gathered rows are copied into expert order first (TMA cannot gather on Hopper:
    one int8 copy of the routed rows, ~1/40 of the GEMM's time at HunyuanImage-3's sizes)."""
    if row_index is not None:
        qa, a_scale = qa.index_select(0, row_index), a_scale.index_select(0, row_index)
    qa = qa.contiguous()
    num_experts, n, k = weight.shape
    ws = weight_scale if weight_scale.stride(1) == 1 else weight_scale.contiguous()
    _ensure_allocator()
    sms = _sm_count(qa.device)
    tiles = bound * cdiv(n, cfg.block_n)
    LAST_COMPILED["grouped_tma"] = _launch_grouped_tma(
        (min(sms, tiles),), qa, weight, out, a_scale.contiguous(), ws, group_offsets.contiguous(), schedule,
        out_row_index.contiguous() if out_row_index is not None else schedule,  # dummy pointer when unused
        out.shape[0], n, k, bound, num_experts, out.stride(0), ws.stride(0), HAS_OUT_INDEX=out_row_index is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_SMS=sms,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@triton.jit
def _silu_gate(h_row, offs, mask, I):
    """``h[:I] * silu(h[I:])`` at ``offs`` in float32; 0 on masked lanes (silu(0) * 0), so they stay out of amax."""
    x1 = tl.load(h_row + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(h_row + I + offs, mask=mask, other=0.0).to(tl.float32)
    return x1 * (x2 * tl.sigmoid(x2))


@triton.jit
def _silu_gate_quantize_kernel(
    h_ptr, q_ptr, scale_ptr, I, stride_hm,
    BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h_row = h_ptr + row * stride_hm
    q_row = q_ptr + row * I
    if SINGLE_PASS:
        offs = tl.arange(0, BLOCK_K)
        mask = offs < I
        v = _silu_gate(h_row, offs, mask, I)
        scale, inv_scale = _row_scale(tl.max(tl.abs(v), axis=0))
        tl.store(q_row + offs, _quantize_value(v, inv_scale), mask=mask)
    else:
        amax_vec = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            amax_vec = tl.maximum(amax_vec, tl.abs(_silu_gate(h_row, offs, offs < I, I)))
        scale, inv_scale = _row_scale(tl.max(amax_vec, axis=0))
        for k0 in range(0, I, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < I
            tl.store(q_row + offs, _quantize_value(_silu_gate(h_row, offs, mask, I), inv_scale), mask=mask)
    tl.store(scale_ptr + row, scale)


_launch_silu_gate = cached_launcher(_silu_gate_quantize_kernel)


def silu_gate_quantize(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h [M, 2I]`` (unit column stride) -> ``(q int8 [M, I], scale float32 [M])`` of ``h[:, :I] * silu(h[:, I:])``.
    Rows longer than the quantization's single pass (``configs.QuantConfig``) take a second read."""
    m, two_i = h.shape
    i = two_i // 2
    q = torch.empty((m, i), dtype=torch.int8, device=h.device)
    scale = torch.empty((m,), dtype=torch.float32, device=h.device)
    if m == 0:
        return q, scale
    if i == 0:
        return q, scale.fill_(1.0)  # an empty row quantizes with scale 1 (quantize_activation's rule)
    block, single, warps = row_block(i)
    _launch_silu_gate((m,), h, q, scale, i, h.stride(0), BLOCK_K=block, SINGLE_PASS=single, num_warps=warps)
    return q, scale
