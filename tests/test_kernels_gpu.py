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
def test_hopper_w8a8_uses_int8_wgmma(gen):
    from comfyui_headroom.kernels import triton_w8a8
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    check_w8a8(triton_w8a8.w8a8_matmul, quantize_rows, 4096, 3072, 3072, "rowwise", gen, BF16, True, 128, DEV)
    ptx = triton_w8a8.LAST_COMPILED["tma"].asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".s32.s8.s8" in ptx, "no int8 wgmma in the Hopper kernel's PTX"
    assert "cp.async.bulk.tensor" in ptx, "no TMA loads in the Hopper kernel's PTX"


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
