"""The Mixture-of-Experts kernels (kernels/grouped.py, kernels/triton_grouped_w8a8.py) on the CPU.

Two halves in one file:

* the normal run: the torch paths (the per-expert INT8 loop against float64, ``grouped_float_linear``,
  ``silu_gate_quantize`` in torch), the tile schedule, and the ValueErrors that name the bad argument;
* ``test_interp_*``: the Triton kernels themselves on Triton's CPU interpreter, against the per-expert loop.
  ``TRITON_INTERPRET`` must be set before triton is imported, and the rest of the suite imports triton without it,
  so :func:`test_triton_grouped_kernels_under_interpreter` runs this file again in a subprocess with
  ``TRITON_INTERPRET=1 -k interp`` (the pattern of tests/test_kernels_interp.py); those tests exist only there.

The int32 accumulation is exact on both sides and the scales multiply in the same order, so float32 outputs must be
EQUAL; bf16 outputs may differ by one bf16 step (the interpreter rounds float32 -> bf16 its own way).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfyui_headroom.kernels.grouped import (
    group_offsets_from_counts,
    grouped_float_linear,
    grouped_int8_linear,
    grouped_int8_linear_loop,
    silu_gate,
    silu_gate_quantize,
)
from testutil import interpreter_unusable, ptxas_spills

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
TESTS = Path(__file__).resolve().parent
BF16_STEP = 2.0 ** -7  # relative spacing of bf16 values (8 significant bits)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and references
# ----------------------------------------------------------------------------------------------------------------

def make_int8_case(counts, n, k, gen, rows=None, index_dtype=torch.int64, offsets_dtype=torch.int64):
    """Random INT8 operands for experts with ``counts`` output rows each. ``rows``: the number of activation rows
    (then every output row gathers one of them at random, with repeats); None: one activation row per output row."""
    counts = torch.tensor(counts, dtype=torch.int64)
    num_experts, m_out = counts.numel(), int(counts.sum())
    m_rows = m_out if rows is None else rows
    qa = torch.randint(-127, 128, (m_rows, k), generator=gen, dtype=torch.int8)
    a_scale = torch.rand(m_rows, generator=gen) * 0.02 + 1e-3
    weight = torch.randint(-127, 128, (num_experts, n, k), generator=gen, dtype=torch.int8)
    weight_scale = torch.rand(num_experts, n, generator=gen) * 0.01 + 1e-4
    offsets = group_offsets_from_counts(counts).to(offsets_dtype)
    row_index = None if rows is None else torch.randint(0, rows, (m_out,), generator=gen).to(index_dtype)
    return qa, a_scale, weight, weight_scale, offsets, row_index


def float64_reference(qa, a_scale, weight, weight_scale, offsets, row_index):
    """Each output row on its own, in float64: written without the loop's slicing, so it checks the loop too."""
    m_out = row_index.numel() if row_index is not None else qa.shape[0]
    out = torch.zeros(m_out, weight.shape[1], dtype=torch.float64)
    bounds = offsets.tolist()
    for m in range(m_out):
        e = max(i for i in range(len(bounds) - 1) if bounds[i] <= m < bounds[i + 1])
        src = int(row_index[m]) if row_index is not None else m
        acc = weight[e].double() @ qa[src].double()
        out[m] = acc * float(a_scale[src]) * weight_scale[e].double()
    return out


def assert_within_one_bf16_step(out: torch.Tensor, ref: torch.Tensor):
    out, ref = out.float(), ref.float()
    step = ref.abs().clamp_min(1e-30) * BF16_STEP
    worst = ((out - ref).abs() / step).max()
    assert worst <= 1.0, f"max deviation {float(worst):.3f} bf16 steps"


def silu_gate_quantize_float64(h: torch.Tensor):
    """Tencent's order in float64: ``x1 * silu(x2)`` with ``x1, x2 = h.chunk(2)``; scale = amax / 127 (1 for 0)."""
    x1, x2 = h.double().chunk(2, dim=-1)
    v = x1 * (x2 * torch.sigmoid(x2))
    amax = v.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(v / scale[:, None]).clamp(-127, 127), scale


def gate_input(m, i, gen, dtype=torch.bfloat16):
    """``[m, 2i]`` with a gate half whose SiLU spans its negative tail and a few large channels."""
    h = torch.randn(m, 2 * i, generator=gen) * 2.0
    h[:, : max(1, i // 8)] *= 10.0
    return h.to(dtype)


def check_silu_gate_quantize(h: torch.Tensor):
    q, scale = silu_gate_quantize(h)
    q_ref, scale_ref = silu_gate_quantize_float64(h)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == (h.shape[0], h.shape[1] // 2) and scale.shape == (h.shape[0],)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)
    assert (q.double() - q_ref).abs().max() <= 1


# Routings: uneven groups; empty experts first, in the middle and last; one expert with every row.
ROUTINGS = {
    "uneven": [5, 0, 37, 1, 12],
    "empty_first_last": [0, 9, 20, 0],
    "one_expert_all_rows": [0, 0, 45, 0],
    "tiny": [3, 2],  # M_out < BLOCK_M
}


# ----------------------------------------------------------------------------------------------------------------
# The normal (CPU) run
# ----------------------------------------------------------------------------------------------------------------

if not INTERPRETING:

    def test_group_offsets_from_counts():
        offsets = group_offsets_from_counts(torch.tensor([0, 3, 0, 5], dtype=torch.int32))
        assert offsets.dtype == torch.int64
        assert offsets.tolist() == [0, 0, 3, 3, 8]
        assert group_offsets_from_counts(torch.zeros(0, dtype=torch.int64)).tolist() == [0]

    @pytest.mark.parametrize("name", sorted(ROUTINGS))
    @pytest.mark.parametrize("gather", [False, True])
    def test_int8_loop_matches_float64(name, gather, gen):
        case = make_int8_case(ROUTINGS[name], 24, 40, gen, rows=7 if gather else None)
        ref = float64_reference(*case)
        out32 = grouped_int8_linear_loop(*case, out_dtype=torch.float32)
        torch.testing.assert_close(out32.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
        assert_within_one_bf16_step(grouped_int8_linear_loop(*case), ref)

    def test_int8_entry_point_on_cpu_is_the_loop(gen):
        case = make_int8_case([4, 0, 19], 16, 24, gen, rows=5, index_dtype=torch.int32, offsets_dtype=torch.int32)
        assert torch.equal(grouped_int8_linear(*case, out_dtype=torch.float32),
                           grouped_int8_linear_loop(*case, out_dtype=torch.float32))

    def test_int8_degenerate_shapes(gen):
        qa, a_scale, weight, weight_scale, offsets, _ = make_int8_case([0, 0, 0], 8, 16, gen)
        assert grouped_int8_linear(qa, a_scale, weight, weight_scale, offsets).shape == (0, 8)
        qa, a_scale, weight, weight_scale, offsets, _ = make_int8_case([2, 3], 8, 0, gen)
        assert torch.equal(grouped_int8_linear(qa, a_scale, weight, weight_scale, offsets), torch.zeros(5, 8,
                                                                                                       dtype=torch.bfloat16))

    @pytest.mark.skipif(not HAS_TRITON, reason="the tile schedule lives in the Triton module")
    @pytest.mark.parametrize("counts,block_m", [([5, 0, 37, 1, 12], 16), ([0, 0, 45, 0], 16), ([3, 2], 64),
                                                ([0, 0], 16), ([16, 32, 0, 1], 16)])
    def test_tile_schedule_covers_every_row_once(counts, block_m):
        from comfyui_headroom.kernels.triton_grouped_w8a8 import tile_schedule

        offsets = group_offsets_from_counts(torch.tensor(counts))
        m_out = sum(counts)
        schedule, bound = tile_schedule(offsets, m_out, block_m)
        assert schedule.dtype == torch.int32 and schedule.shape == (2, bound)
        assert bound == -(-m_out // block_m) + len(counts)
        covered = []
        bounds = offsets.tolist()
        real = schedule[0] >= 0
        # the real tiles come first, then only tiles that return at once
        assert real.tolist() == sorted(real.tolist(), reverse=True)
        for expert, first in schedule[:, real].t().tolist():
            end = bounds[expert + 1]
            assert bounds[expert] <= first < end
            covered += list(range(first, min(first + block_m, end)))
        assert sorted(covered) == list(range(m_out))
        assert int(real.sum()) == sum(-(-c // block_m) for c in counts)

    @pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
    @pytest.mark.parametrize("tile,gather", [(0, True), (2, False)])
    def test_grouped_kernel_compiles_for_sm90_pipelined_without_spills(tile, gather, tmp_path):
        """No GPU here: compile the Hopper tiles for an H100/H200 with the specialization a launch at
        HunyuanImage-3's sizes gets (16-byte aligned pointers, sizes and strides multiples of 16), and check the
        code: int8 wgmma, cp.async loads in ``num_stages`` shared-memory buffers (the software pipeline), within
        the 227 KB a block may have, no register spills."""
        import triton
        from comfyui_headroom.kernels import triton_grouped_w8a8 as tg
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        cfg = tg.GROUPED_CONFIGS["sm90"][tile]
        fn = tg._grouped_w8a8_kernel
        pointers = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "as_ptr": "*fp32", "ws_ptr": "*fp32",
                    "offsets_ptr": "*i64", "schedule_ptr": "*i32", "row_index_ptr": "*i64", "out_index_ptr": "*i64"}
        constexprs = dict(HAS_ROW_INDEX=gather, HAS_OUT_INDEX=not gather, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          GROUP_M=cfg.group_m, EVEN_K=True)
        signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name not in constexprs}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 128),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = compiled.asm["ptx"]
        assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx), "no int8 wgmma in the PTX"
        assert "cp.async" in ptx, "no asynchronous copies: the K loop is not pipelined"
        stage_bytes = (cfg.block_m + cfg.block_n) * cfg.block_k
        assert compiled.metadata.shared >= cfg.num_stages * stage_bytes, "fewer shared-memory stages than asked"
        assert compiled.metadata.shared <= 232448, "more shared memory than a Hopper block may have (227 KB)"
        spills = ptxas_spills(ptx, tmp_path)
        assert spills is None or spills == 0, f"the grouped kernel spills {spills} bytes of registers"

    @pytest.mark.parametrize("dtype,n,k", [(torch.bfloat16, 24, 32), (torch.bfloat16, 20, 30), (torch.float32, 24, 32)])
    def test_float_linear_matches_loop(dtype, n, k, gen):
        counts = [0, 7, 0, 13, 1, 0]
        offsets = group_offsets_from_counts(torch.tensor(counts))
        x = torch.randn(sum(counts), k, generator=gen).to(dtype)
        weight = (torch.randn(len(counts), n, k, generator=gen) * 0.1).to(dtype)
        out = grouped_float_linear(x, weight, offsets)
        assert out.dtype == dtype and out.shape == (sum(counts), n)
        bounds = offsets.tolist()
        ref = torch.cat([x[bounds[e]:bounds[e + 1]].double() @ weight[e].double().t() for e in range(len(counts))])
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))

    def test_float_linear_int32_offsets_and_empty_rows(gen):
        weight = torch.randn(3, 8, 16, generator=gen).to(torch.bfloat16)
        out = grouped_float_linear(torch.zeros(0, 16, dtype=torch.bfloat16), weight,
                                   torch.zeros(4, dtype=torch.int32))
        assert out.shape == (0, 8)

    def test_silu_gate_order_is_tencents(gen):
        h = gate_input(4, 16, gen, torch.float32)
        x1, x2 = h[:, :16], h[:, 16:]
        torch.testing.assert_close(silu_gate(h), x1 * F.silu(x2))
        assert not torch.allclose(silu_gate(h), x2 * F.silu(x1), atol=1e-2)

    @pytest.mark.parametrize("m,i,dtype", [(5, 48, torch.bfloat16), (3, 33, torch.float32), (2, 8, torch.float16)])
    def test_silu_gate_quantize_torch_path(m, i, dtype, gen):
        check_silu_gate_quantize(gate_input(m, i, gen, dtype))

    def test_silu_gate_quantize_swapped_halves_would_fail(gen):
        h = gate_input(6, 32, gen)
        swapped = torch.cat([h[:, 32:], h[:, :32]], dim=1)
        q, _ = silu_gate_quantize(h)
        q_swapped, _ = silu_gate_quantize_float64(swapped)
        assert (q.double() - q_swapped).abs().max() > 1  # the order check in check_silu_gate_quantize can fail

    def test_silu_gate_quantize_zero_rows_and_leading_dims(gen):
        h = torch.zeros(2, 3, 16, dtype=torch.bfloat16)
        q, scale = silu_gate_quantize(h)
        assert q.shape == (6, 8) and torch.equal(scale, torch.ones(6)) and not q.any()

    def _bad_int8_calls(gen):
        qa, a_scale, weight, weight_scale, offsets, _ = make_int8_case([3, 0, 2], 8, 16, gen)
        good = dict(qa=qa, a_scale=a_scale, weight=weight, weight_scale=weight_scale, group_offsets=offsets)
        bad = [
            ("qa", dict(qa=qa.float())),
            ("qa", dict(qa=qa[None])),
            ("a_scale", dict(a_scale=a_scale[:-1])),
            ("a_scale", dict(a_scale=a_scale.half())),
            ("weight", dict(weight=weight[0])),
            ("weight", dict(weight=weight[:, :, :-1])),
            ("weight", dict(weight=weight.float())),
            ("weight_scale", dict(weight_scale=weight_scale[:, 0])),
            ("weight_scale", dict(weight_scale=weight_scale.double())),
            ("group_offsets", dict(group_offsets=offsets[:-1])),
            ("group_offsets", dict(group_offsets=offsets.float())),
            ("group_offsets", dict(group_offsets=torch.tensor([0, 3, 3, 4]))),  # ends before M_out
            ("group_offsets", dict(group_offsets=torch.tensor([0, 4, 2, 5]))),  # goes down
            ("group_offsets", dict(group_offsets=torch.tensor([1, 3, 3, 5]))),  # does not start at 0
            ("row_index", dict(row_index=torch.zeros(5))),
            ("row_index", dict(row_index=torch.tensor([0, 1, 2, 3, 5]))),  # qa has 5 rows
            ("row_index", dict(row_index=torch.tensor([0, 1, -1, 3, 4]))),
            ("out_dtype", dict(out_dtype=torch.int8)),
            ("weight", dict(weight=weight.to("meta"))),
            ("group_offsets", dict(group_offsets=offsets.to("meta"))),
            ("out_row_index", dict(out_row_index=torch.tensor([0, 1, 2, 3]))),  # 5 output rows
            ("out_row_index", dict(out_row_index=torch.tensor([0, 1, 1, 3, 4]))),  # not a permutation
        ]
        return good, bad

    @pytest.mark.parametrize("case", range(22))
    @pytest.mark.parametrize("fn", [grouped_int8_linear, grouped_int8_linear_loop])
    def test_int8_bad_inputs_name_the_argument(fn, case, gen):
        good, bad = _bad_int8_calls(gen)
        name, change = bad[case]
        with pytest.raises(ValueError, match=rf"grouped_int8_linear: {name} "):
            fn(**{**good, **change})

    def test_bad_call_list_is_fully_parametrized(gen):
        assert len(_bad_int8_calls(gen)[1]) == 22

    def test_out_row_index_scatters_rows_in_the_loop(gen):
        case = make_int8_case([3, 0, 4, 2], 8, 16, gen, rows=5)
        order = torch.randperm(9, generator=gen)
        plain = grouped_int8_linear_loop(*case, out_dtype=torch.float32)
        scattered = grouped_int8_linear(*case, out_dtype=torch.float32, out_row_index=order)
        assert torch.equal(scattered[order], plain)

    def test_float_linear_bad_inputs(gen):
        x = torch.randn(5, 16).to(torch.bfloat16)
        weight = torch.randn(2, 8, 16).to(torch.bfloat16)
        offsets = torch.tensor([0, 2, 5])
        for name, args in [
            ("x", (x.int(), weight, offsets)),
            ("weight", (x, weight.float(), offsets)),
            ("weight", (x, weight[:, :, :-1], offsets)),
            ("group_offsets", (x, weight, offsets[:-1])),
            ("group_offsets", (x, weight, torch.tensor([0, 2, 4]))),
            ("weight", (x, weight.to("meta"), offsets)),
        ]:
            with pytest.raises(ValueError, match=rf"grouped_float_linear: {name} "):
                grouped_float_linear(*args)

    @pytest.mark.parametrize("fn", [silu_gate_quantize, silu_gate])
    def test_gate_bad_inputs(fn):
        for h in (torch.zeros(4, 7), torch.zeros(4, 8, dtype=torch.int32), torch.zeros(8)):
            with pytest.raises(ValueError, match=r": h "):
                fn(h)
        with pytest.raises(ValueError, match=r"counts"):
            group_offsets_from_counts(torch.ones(3))

    @pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
    def test_triton_grouped_kernels_under_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
        env.pop("HEADROOM_FORCE_KERNEL", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp",
               str(Path(__file__).resolve())]
        proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"interpreter grouped tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels on the interpreter (only in the subprocess above)
# ----------------------------------------------------------------------------------------------------------------

if INTERPRETING:
    from comfyui_headroom.kernels import configs, triton_grouped_w8a8
    from comfyui_headroom.kernels.configs import GemmConfig, QuantConfig

    # BLOCK_K 32 with K = 40/70 leaves K tails; BLOCK_N 16/32 with N = 40 leaves column tails.
    TILE = GemmConfig(16, 32, 32, group_m=2, num_warps=4, num_stages=2)
    TALL = GemmConfig(32, 16, 16, group_m=4, num_warps=4, num_stages=2)

    def run_grouped(case, tile, out_dtype):
        """The Triton kernel through the public entry point, and the loop on the same inputs."""
        triton_grouped_w8a8.LAST_COMPILED.clear()
        with triton_grouped_w8a8.override(tile):
            out = grouped_int8_linear(*case, out_dtype=out_dtype)
        assert "grouped" in triton_grouped_w8a8.LAST_COMPILED  # the kernel ran, not the loop
        return out, grouped_int8_linear_loop(*case, out_dtype=out_dtype)

    @pytest.mark.parametrize("name", sorted(ROUTINGS))
    @pytest.mark.parametrize("gather", [False, True])
    def test_interp_grouped_matches_loop(name, gather, gen):
        case = make_int8_case(ROUTINGS[name], 40, 70, gen, rows=11 if gather else None)
        out, ref = run_grouped(case, TILE, torch.float32)
        assert torch.equal(out, ref)
        out, ref = run_grouped(case, TILE, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        assert_within_one_bf16_step(out, ref)

    def test_interp_grouped_other_tile_int32_indices_even_k(gen):
        # BLOCK_M 32 > every group but one; int32 offsets and row index; K a multiple of BLOCK_K (no K mask)
        case = make_int8_case([1, 33, 0, 2, 0, 7], 40, 32, gen, rows=9, index_dtype=torch.int32,
                              offsets_dtype=torch.int32)
        out, ref = run_grouped(case, TALL, torch.float32)
        assert torch.equal(out, ref)

    def test_interp_grouped_fp16_and_the_default_tile(gen):
        case = make_int8_case([6, 0, 9], 24, 40, gen, rows=4)
        triton_grouped_w8a8.LAST_COMPILED.clear()
        out = grouped_int8_linear(*case, out_dtype=torch.float16)  # the "cpu" architecture's own tile
        assert "grouped" in triton_grouped_w8a8.LAST_COMPILED
        torch.testing.assert_close(out, grouped_int8_linear_loop(*case, out_dtype=torch.float16), rtol=1e-3, atol=0)

    @pytest.mark.parametrize("gather", [False, True])
    def test_interp_grouped_scatter_store_matches_loop(gather, gen):
        # out_row_index: each row stored at its token x slot position (a MoE's down projection, un-sorted in place)
        case = make_int8_case([5, 0, 17, 3], 40, 70, gen, rows=9 if gather else None)
        order = torch.randperm(25, generator=gen)
        triton_grouped_w8a8.LAST_COMPILED.clear()
        with triton_grouped_w8a8.override(TILE):
            out = grouped_int8_linear(*case, out_dtype=torch.float32, out_row_index=order)
        assert "grouped" in triton_grouped_w8a8.LAST_COMPILED
        ref = grouped_int8_linear_loop(*case, out_dtype=torch.float32)
        assert torch.equal(out[order], ref)

    def test_interp_grouped_is_not_the_loop_by_accident(gen):
        # Sanity of the comparison itself: shifting one expert's rows by one changes the result.
        qa, a_scale, weight, weight_scale, offsets, row_index = make_int8_case([5, 0, 37], 40, 70, gen)
        with triton_grouped_w8a8.override(TILE):
            out = grouped_int8_linear(qa, a_scale, weight, weight_scale, offsets, out_dtype=torch.float32)
        shifted = torch.tensor([0, 6, 6, 42])
        ref = grouped_int8_linear_loop(qa, a_scale, weight, weight_scale, shifted, out_dtype=torch.float32)
        assert not torch.equal(out, ref)

    @pytest.mark.parametrize("m,i,dtype", [(5, 48, torch.bfloat16), (3, 33, torch.float32), (2, 8, torch.float16)])
    def test_interp_silu_gate_quantize(m, i, dtype, gen):
        check_silu_gate_quantize(gate_input(m, i, gen, dtype))

    def test_interp_silu_gate_quantize_two_passes_and_strided_rows(gen):
        wide = gate_input(4, 80, gen)  # a view with row stride 200 > 2I = 160
        wide = torch.cat([wide, torch.zeros(4, 40, dtype=wide.dtype)], dim=1)[:, :160]
        with configs.override(quant=QuantConfig(max_single_pass=64, loop_block=32, num_warps=4)):
            check_silu_gate_quantize(wide)

    def test_interp_silu_gate_quantize_order(gen):
        h = gate_input(6, 32, gen)
        swapped = torch.cat([h[:, 32:], h[:, :32]], dim=1)
        q, _ = silu_gate_quantize(h)
        q_swapped, _ = silu_gate_quantize_float64(swapped)
        assert (q.double() - q_swapped).abs().max() > 1

    def test_interp_silu_gate_quantize_zero_row(gen):
        h = gate_input(3, 16, gen)
        h[1] = 0
        q, scale = silu_gate_quantize(h)
        assert float(scale[1]) == 1.0 and not q[1].any()
        check_silu_gate_quantize(h)
