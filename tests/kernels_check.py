"""Shared checks for the INT8 kernels: used by the interpreter cases (CPU) and the GPU tests.

Every check draws fresh random inputs with outlier channels, poisons the kernel's outputs before the run
(NaN for float outputs, -128 for int8 - a value the quantizer never writes) and compares with float64
references: on the quantized operands (what the kernel must compute exactly up to output rounding) and,
separately, on the unquantized layer (what quantization costs).
"""

from __future__ import annotations

import torch
from comfyui_headroom.kernels.int8 import dequantize_weight, quantize_activation, quantize_weight, relative_error

# Tolerances from issue #3: vs float64 on the quantized operands.
TOL = {torch.bfloat16: 5e-3, torch.float16: 2e-3, torch.float32: 1e-5}


def activations(m: int, k: int, gen: torch.Generator, dtype, device="cpu", outliers: int = 3) -> torch.Tensor:
    """Normal activations with a few large channels (the LLM.int8 / diffusion outlier pattern)."""
    x = torch.randn(m, k, generator=gen)
    if outliers and k > outliers:
        idx = torch.randperm(k, generator=gen)[:outliers]
        x[:, idx] *= 25.0
    return x.to(device=device, dtype=dtype)


def weights(n: int, k: int, gen: torch.Generator, method: str, block_size: int, device="cpu", outliers: int = 3):
    w = torch.randn(n, k, generator=gen) * 0.05
    if outliers and k > outliers:
        idx = torch.randperm(k, generator=gen)[:outliers]
        w[:, idx] *= 30.0
    qw, sw = quantize_weight(w, method, block_size)
    return w.to(device), qw.to(device), sw.to(device)


def bias_for(n: int, gen: torch.Generator, dtype, device="cpu"):
    return (torch.randn(n, generator=gen) * 0.5).to(device=device, dtype=dtype)


def w8a8_reference(qa, a_scale, qw, w_scale, bias, block_size) -> torch.Tensor:
    """float64 ``(qa * a_scale) @ dequant(qw).T + bias``: the exact function of the quantized operands."""
    a = qa.double() * a_scale.double()[:, None]
    w = dequantize_weight(qw, w_scale, torch.float64, block_size)
    y = a @ w.T
    return y + bias.double() if bias is not None else y


def w8a16_reference(x, qw, w_scale, bias, block_size) -> torch.Tensor:
    w = dequantize_weight(qw, w_scale, torch.float64, block_size)
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


def float_reference(x, w, bias) -> torch.Tensor:
    y = x.double() @ w.double().to(x.device).T
    return y + bias.double() if bias is not None else y


def poisoned(shape, dtype, device) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.full(shape, -128, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_written_and_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> float:
    assert torch.isfinite(out).all(), f"{what}: output has NaN/inf (unwritten or broken elements)"
    err = relative_error(out, ref.to(out.device))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
    return err


def check_quantize(quantize_rows, m, k, gen, dtype, device="cpu", zero_row=True) -> None:
    """Triton activation quantization vs quantize_activation: the same scales (to 1 ulp: torch divides on
    the CPU and multiplies by fl(1/127) on CUDA) and the same int8 values, except one step where
    ``x / scale`` is within rounding of a tie (the kernel multiplies by the reciprocal)."""
    x = activations(m, k, gen, dtype, device)
    if zero_row and m > 1:
        x[m // 2] = 0
    q = poisoned((m, k), torch.int8, device)
    s = poisoned((m,), torch.float32, device)
    quantize_rows(x, q_out=q, scale_out=s)
    q_ref, s_ref = quantize_activation(x)
    what = f"quantize {m}x{k} {dtype}"
    assert (q != -128).all(), f"{what}: unwritten int8 outputs"
    assert torch.isfinite(s).all(), f"{what}: unwritten scales"
    torch.testing.assert_close(s, s_ref, rtol=2.5e-7, atol=0, msg=lambda msg: f"{what}: scales differ: {msg}")
    if zero_row and m > 1:
        assert s[m // 2] == 1.0 and (q[m // 2] == 0).all(), f"{what}: an all-zero row must give scale 1, q 0"
    diff = (q.int() - q_ref.int()).abs()
    off = int((diff > 0).sum())
    assert int(diff.max()) <= 1 and off <= max(2, 1e-4 * q.numel()), f"{what}: {off} int8 values differ (max {int(diff.max())})"


def check_w8a8(w8a8_matmul, quantize_rows, m, n, k, method, gen, dtype, has_bias=True, block_size=128,
               device="cpu", out_dtype=None) -> float:
    """Triton quant + W8A8 GEMM vs float64 on the quantized operands; returns the relative error."""
    out_dtype = out_dtype or dtype
    x = activations(m, k, gen, dtype, device)
    _, qw, sw = weights(n, k, gen, method, block_size, device)
    bias = bias_for(n, gen, dtype, device) if has_bias else None
    qa, sa = quantize_rows(x)
    out = poisoned((m, n), out_dtype, device)
    w8a8_matmul(qa, sa, qw, sw, bias, out_dtype, block_size, out=out)
    ref = w8a8_reference(qa, sa, qw, sw, bias, block_size)
    return assert_written_and_close(out, ref, TOL[out_dtype], f"W8A8 {m}x{n}x{k} {method} bias={has_bias} {out_dtype}")


def check_w8a16(w8a16_matmul, m, n, k, method, gen, dtype, has_bias=True, block_size=128, device="cpu",
                split_k=None) -> float:
    x = activations(m, k, gen, dtype, device)
    _, qw, sw = weights(n, k, gen, method, block_size, device)
    bias = bias_for(n, gen, dtype, device) if has_bias else None
    out = poisoned((m, n), dtype, device)
    w8a16_matmul(x, qw, sw, bias, block_size, split_k=split_k, out=out)
    ref = w8a16_reference(x, qw, sw, bias, block_size)
    return assert_written_and_close(out, ref, TOL[dtype], f"W8A16 {m}x{n}x{k} {method} bias={has_bias} {dtype}")


def check_vs_float_layer(linear_fn, m, n, k, gen, dtype, method="rowwise", device="cpu", tol=0.02) -> float:
    """The whole quantized layer vs the unquantized float64 layer on normal (outlier-free) data."""
    x = activations(m, k, gen, dtype, device, outliers=0)
    w = (torch.randn(n, k, generator=gen) * 0.05)
    qw, sw = quantize_weight(w, method, 128)
    bias = bias_for(n, gen, dtype, device)
    y = linear_fn(x, qw.to(device), sw.to(device), bias, 128)
    return assert_written_and_close(y, float_reference(x, w, bias), tol, f"layer vs float {m}x{n}x{k} {method}")
