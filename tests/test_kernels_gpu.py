"""The Triton kernels at real shapes on a CUDA GPU (skipped without one; run through the device tool).

Same checks as the interpreter cases (tests/kernels_check.py): fresh outlier data per check, poisoned
outputs, float64 references on the quantized operands. Plus: the Hopper kernel really issues int8 wgmma,
the dispatcher's automatic choices, and torch.compile (inductor) with no graph break.
"""

import pytest
import torch
from kernels_check import check_quantize, check_vs_float_layer, check_w8a8, check_w8a16

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DEV = "cuda"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


def _sm90() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("m,k,dtype", [(1, 3072, BF16), (77, 5120, BF16), (4096, 12288, BF16), (300, 20000, BF16),
                                       (64, 3072, FP16), (33, 1001, FP32)])
def test_quantize_kernel_matches_reference(m, k, dtype, gen):
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    check_quantize(quantize_rows, m, k, gen, dtype, DEV)


W8A8_CASES = [
    # m, n, k, method, bias, dtype, out dtype
    (1, 3072, 3072, "rowwise", True, BF16, BF16),
    (77, 3072, 3072, "rowwise", False, BF16, BF16),
    (1024, 3072, 3072, "rowwise", True, BF16, BF16),
    (4096, 12288, 3072, "rowwise", True, BF16, BF16),
    (1000, 3000, 3072, "tensorwise", True, BF16, BF16),   # tile-unaligned M/N, TMA path
    (1000, 777, 1001, "rowwise", True, BF16, BF16),       # odd K, odd N: pointer kernel
    (1024, 3072, 3072, "block", True, BF16, BF16),
    (333, 1000, 1000, "block", False, BF16, BF16),        # block + K % 16 != 0
    (257, 1024, 1024, "rowwise", True, FP32, FP32),
    (300, 5120, 5120, "block", True, FP16, FP16),
]


@pytest.mark.parametrize("m,n,k,method,has_bias,dtype,out_dtype", W8A8_CASES)
def test_w8a8_kernel(m, n, k, method, has_bias, dtype, out_dtype, gen):
    from comfyui_headroom.kernels.triton_quant import quantize_rows
    from comfyui_headroom.kernels.triton_w8a8 import w8a8_matmul

    check_w8a8(w8a8_matmul, quantize_rows, m, n, k, method, gen, dtype, has_bias, 128, DEV, out_dtype)


W8A16_CASES = [
    (1, 3072, 3072, "rowwise", True, BF16),
    (1, 13824, 5120, "tensorwise", False, BF16),
    (16, 5120, 5120, "block", True, BF16),
    (256, 3072, 12288, "rowwise", True, BF16),
    (7, 777, 1001, "rowwise", True, FP16),
    (3, 1024, 1024, "block", False, FP32),
]


@pytest.mark.parametrize("m,n,k,method,has_bias,dtype", W8A16_CASES)
def test_w8a16_kernel(m, n, k, method, has_bias, dtype, gen):
    from comfyui_headroom.kernels.triton_w8a16 import w8a16_matmul

    check_w8a16(w8a16_matmul, m, n, k, method, gen, dtype, has_bias, 128, DEV)


@pytest.mark.parametrize("m", [1, 1024])
def test_layer_vs_unquantized_layer(m, gen):
    from comfyui_headroom.kernels import int8_linear

    check_vs_float_layer(int8_linear, m, 3072, 3072, gen, BF16, device=DEV)


def test_int_mm_backend_on_gpu(gen):
    from comfyui_headroom.kernels import force_kernel, int8_linear, kernel_summary, reset_kernel_stats

    reset_kernel_stats()
    with force_kernel("int_mm"):
        check_vs_float_layer(int8_linear, 512, 3072, 3072, gen, BF16, device=DEV)
    assert list(kernel_summary()) == ["int_mm"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="Hopper only")
@pytest.mark.parametrize("variant", ["gluon", "tma"])
def test_hopper_w8a8_uses_int8_wgmma(variant, gen):
    """Both Hopper kernels (the Gluon one by default, the Triton TMA one with HEADROOM_GLUON=0) issue int8 wgmma
    fed by TMA."""
    from comfyui_headroom.kernels import configs, triton_w8a8
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    triton_w8a8.LAST_COMPILED.pop(variant, None)
    configs.set_gluon(variant == "gluon")
    try:
        check_w8a8(triton_w8a8.w8a8_matmul, quantize_rows, 4096, 3072, 3072, "rowwise", gen, BF16, True, 128, DEV)
    finally:
        configs.set_gluon(True)
    ptx = triton_w8a8.LAST_COMPILED[variant].asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".s32.s8.s8" in ptx, "no int8 wgmma in the Hopper kernel's PTX"
    assert "cp.async.bulk.tensor" in ptx, "no TMA loads in the Hopper kernel's PTX"


GLUON_CASES = [
    # m, n, k, method, bias, dtype: aligned rowwise/tensorwise shapes with 16-bit output take the Gluon kernel
    (4096, 3072, 3072, "rowwise", True, BF16),
    (2500, 13824, 5120, "rowwise", False, BF16),       # M, N not tile multiples
    (1100, 12296, 3088, "tensorwise", True, BF16),     # K not a multiple of the 128 K tile
    (4100, 3072, 1040, "rowwise", True, FP16),
    (16384, 3072, 12288, "rowwise", True, BF16),
]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="Hopper only")
@pytest.mark.parametrize("m,n,k,method,has_bias,dtype", GLUON_CASES)
def test_gluon_w8a8_kernel(m, n, k, method, has_bias, dtype, gen):
    from comfyui_headroom.kernels import triton_w8a8
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    triton_w8a8.LAST_COMPILED.pop("gluon", None)
    check_w8a8(triton_w8a8.w8a8_matmul, quantize_rows, m, n, k, method, gen, dtype, has_bias, 128, DEV)
    assert "gluon" in triton_w8a8.LAST_COMPILED, "this shape did not take the Gluon kernel"


def test_dispatcher_auto_choices_on_this_gpu(gen):
    from comfyui_headroom import kernels
    from comfyui_headroom.quant import Int8Linear

    layer = Int8Linear.from_linear(torch.nn.Linear(3072, 3072, dtype=BF16)).to(DEV)
    kernels.reset_kernel_stats()
    with torch.inference_mode():
        layer(torch.randn(1, 1, 3072, device=DEV, dtype=BF16))
        layer(torch.randn(2, 2048, 3072, device=DEV, dtype=BF16))
    summary = kernels.kernel_summary()
    assert summary["triton_w8a16"]["shapes"] == {"1x3072x3072": 1}
    big = "int_mm" if torch.cuda.get_device_capability()[0] == 8 else "triton_w8a8"
    assert summary[big]["shapes"] == {"4096x3072x3072": 1}


def test_torch_compile_inductor_fullgraph_on_gpu(gen):
    from comfyui_headroom.quant import Int8Linear

    block = torch.nn.Sequential(
        Int8Linear.from_linear(torch.nn.Linear(1024, 4096, dtype=BF16)),
        torch.nn.GELU(),
        Int8Linear.from_linear(torch.nn.Linear(4096, 1024, dtype=BF16), method="block"),
    ).to(DEV)
    x = torch.randn(2, 512, 1024, device=DEV, dtype=BF16)
    with torch.inference_mode():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def _offset_rows(t: torch.Tensor, offset_elems: int) -> torch.Tensor:
    """``t``'s values in a fresh buffer starting ``offset_elems`` in (an address that is not 16-byte aligned)."""
    flat = torch.empty(t.numel() + offset_elems, dtype=t.dtype, device=t.device)
    view = flat[offset_elems:].view(t.shape)
    view.copy_(t)
    return view


def test_direct_launches_match_jitfunction_run(gen):
    """kernels/launch.py: every kernel launched through the cached CompiledKernel gives bit-identical results
    to JITFunction.run, across shapes and aligned/unaligned inputs (which Triton compiles separately), and
    the direct path is really taken."""
    from comfyui_headroom.kernels import launch
    from comfyui_headroom.kernels.hadamard import rotate_quantize_rows
    from comfyui_headroom.kernels.int8 import quantize_weight
    from comfyui_headroom.kernels.triton_quant import quantize_rows
    from comfyui_headroom.kernels.triton_w8a8 import w8a8_matmul
    from comfyui_headroom.kernels.triton_w8a16 import w8a16_matmul

    def run_all(x, qw, sw, bias):
        qa, sa = quantize_rows(x)
        outs = [qa, sa, w8a8_matmul(qa, sa, qw, sw, bias, x.dtype), w8a16_matmul(x[:8], qw, sw, bias)]
        if x.shape[1] % 64 == 0:
            outs += list(rotate_quantize_rows(x, 64))
        return outs

    cases = []
    cases_mkn = [(256, 3072, 1024, 0), (300, 1024, 3072, 0), (77, 1000, 520, 0), (256, 3072, 1024, 1)]
    if _sm90():
        cases_mkn.append((4096, 3072, 3072, 0))  # the Gluon kernel (host-side TMA descriptors)
    for m, k, n, offset in cases_mkn:
        x = torch.randn(m, k, generator=gen).to(DEV, BF16)
        qw, sw = quantize_weight((torch.randn(n, k, generator=gen) * 0.02).to(DEV), "rowwise")
        bias = torch.randn(n, generator=gen).to(DEV, BF16)
        if offset:  # unaligned activation: the pointer kernel, compiled without the alignment assumption
            x = _offset_rows(x, offset)
            assert x.data_ptr() % 16 != 0
        cases.append((x, qw, sw, bias))
    launch.set_fast_launch(False)
    try:
        expected = [run_all(*case) for case in cases]
    finally:
        launch.set_fast_launch(True)
    before = sum(launcher.fast_calls for launcher in launch._LAUNCHERS)
    for _ in range(2):  # first round may compile/fill the cache, second is all direct
        got = [run_all(*case) for case in cases]
    torch.cuda.synchronize()
    assert sum(launcher.fast_calls for launcher in launch._LAUNCHERS) - before >= len(cases) * 4
    for case_expected, case_got in zip(expected, got):
        for e, g in zip(case_expected, case_got):
            assert torch.equal(e, g)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="Hopper only")
def test_launch_plans_give_the_normal_paths_results(gen):
    """kernels/plans.py: the first call of a signature takes the normal path and leaves a plan; planned calls
    with new data give bit-identical results to the normal path (forced kernel = no plan) and count as
    triton_w8a8; M <= 16 (W8A16) is never planned."""
    from comfyui_headroom.kernels import dispatch, force_kernel, int8_linear, kernel_summary, reset_kernel_stats
    from comfyui_headroom.kernels.int8 import quantize_weight
    from comfyui_headroom.kernels.plans import LinearPlan, signature

    qw, sw = quantize_weight((torch.randn(1024, 3072, generator=gen) * 0.02).to(DEV), "rowwise")
    bias = torch.randn(1024, generator=gen).to(DEV, BF16)
    dispatch._plans.clear()
    reset_kernel_stats()
    with torch.no_grad():
        for b in (bias, None):
            x = torch.randn(2, 2048, 3072, generator=gen).to(DEV, BF16)
            int8_linear(x, qw, sw, b)
            assert isinstance(dispatch._plans[signature(x, qw, sw, b, 128)], LinearPlan)
            x_new = torch.randn(2, 2048, 3072, generator=gen).to(DEV, BF16)
            planned = int8_linear(x_new, qw, sw, b)
            with force_kernel("triton_w8a8"):
                normal = int8_linear(x_new, qw, sw, b)
            assert planned.shape == (2, 2048, 1024)
            assert torch.equal(planned, normal), "a planned call differs from the normal path"
        small = torch.randn(1, 8, 3072, generator=gen).to(DEV, BF16)
        int8_linear(small, qw, sw, bias)
        int8_linear(small, qw, sw, bias)
        assert dispatch._plans[signature(small, qw, sw, bias, 128)] is dispatch._NO_PLAN
    summary = kernel_summary()
    assert summary["triton_w8a8"]["shapes"] == {"4096x1024x3072": 6}
    assert summary["triton_w8a16"]["shapes"] == {"8x1024x3072": 2}
    # An activation already in INT8 (what fused producers hand Int8Linear.forward_int8): planned the same way.
    from comfyui_headroom.kernels.dispatch import int8_linear_int8_input
    from comfyui_headroom.kernels.plans import signature_int8_input
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    qa, sa = quantize_rows(torch.randn(4096, 3072, generator=gen).to(DEV, BF16))
    int8_linear_int8_input(qa, sa, qw, sw, bias, BF16)
    assert isinstance(dispatch._plans[signature_int8_input(qa, sa, qw, sw, bias, BF16, 128)], LinearPlan)
    qa2, sa2 = quantize_rows(torch.randn(4096, 3072, generator=gen).to(DEV, BF16))
    planned = int8_linear_int8_input(qa2, sa2, qw, sw, bias, BF16)
    with force_kernel("triton_w8a8"):
        assert torch.equal(planned, int8_linear_int8_input(qa2, sa2, qw, sw, bias, BF16))
    dispatch._plans.clear()
