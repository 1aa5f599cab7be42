"""The INT8 weight: quantize/dequantize error bounds, scales, activation quantization."""

import math

import pytest
import torch
from comfyui_headroom.kernels.int8 import expand_scale, method_of_scale
from comfyui_headroom.quant import dequantize_weight, quantize_activation, quantize_weight, relative_error
from testutil import outlier_weight


@pytest.mark.parametrize("method", ["rowwise", "block", "tensorwise"])
def test_roundtrip_error_is_bounded_by_half_a_step(method, gen):
    w = torch.randn(256, 512, generator=gen)
    q, scale = quantize_weight(w, method)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(q.abs().max()) <= 127
    err = (dequantize_weight(q, scale) - w).abs()
    step = expand_scale(scale, tuple(w.shape))
    assert bool((err <= step / 2 + 1e-6).all())


def test_granularity_order_on_outlier_channels(gen):
    w = outlier_weight(512, 1024, gen)
    errors = {m: relative_error(dequantize_weight(*quantize_weight(w, m)), w) for m in ("block", "rowwise", "tensorwise")}
    assert errors["block"] < errors["rowwise"] < errors["tensorwise"]
    assert errors["block"] < 0.05


def test_scale_shapes_and_inference(gen):
    w = torch.randn(64, 300, generator=gen)
    assert quantize_weight(w, "rowwise")[1].shape == (64,)
    assert quantize_weight(w, "tensorwise")[1].shape == ()
    q, s = quantize_weight(w, "block", block_size=128)
    assert s.shape == (64, math.ceil(300 / 128))
    assert method_of_scale(s) == "block"
    assert method_of_scale(torch.ones(64, 1)) == "rowwise"
    assert method_of_scale(torch.ones(1)) == "tensorwise"
    # Odd in_features with a partial last block still round-trips.
    assert relative_error(dequantize_weight(q, s), w) < 0.01


@pytest.mark.parametrize("method", ["rowwise", "block", "tensorwise"])
def test_zero_rows_give_finite_scales(method):
    w = torch.zeros(8, 256)
    w[3, 5] = 2.0
    q, scale = quantize_weight(w, method)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    deq = dequantize_weight(q, scale)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(256))
    assert deq[3, 5] == pytest.approx(2.0, rel=1e-6)


def test_activation_quantization_is_per_token(gen):
    x = torch.randn(3, 5, 64, generator=gen)
    x[0, 0] *= 100
    x[1, 2] = 0
    q, scale = quantize_activation(x)
    assert q.shape == x.shape and q.dtype == torch.int8 and scale.shape == (3, 5)
    assert torch.isfinite(scale).all()
    recon = q.float() * scale[..., None]
    assert relative_error(recon[1, 1], x[1, 1]) < 0.01  # unaffected by the outlier token
    assert torch.equal(recon[1, 2], torch.zeros(64))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown INT8 method"):
        quantize_weight(torch.randn(4, 4), "int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="already"):
        quantize_weight(torch.zeros(4, 4, dtype=torch.int8))


@pytest.mark.parametrize("where", ["weight_scale", "bias"])
def test_a_layer_tensor_on_another_device_is_refused_before_any_kernel(where, gen):
    """A kernel given a bias or scale from another device (an offloading hook that left the bias on ``meta``, say)
    would read a wrong address and, on a GPU, take the whole CUDA context down: both GEMM entry points refuse it."""
    from comfyui_headroom.kernels import int8_linear
    from comfyui_headroom.kernels.dispatch import int8_linear_int8_input

    x = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    qw, sw = quantize_weight(torch.randn(16, 32, generator=gen))
    bias = torch.randn(16, generator=gen)
    scale = sw.to("meta") if where == "weight_scale" else sw
    b = bias.to("meta") if where == "bias" else bias
    with pytest.raises(ValueError, match=f"{'bias' if where == 'bias' else 'scale'} on meta.*move the layer"):
        int8_linear(x, qw, scale, b)
    qa, sa = quantize_activation(x)
    with pytest.raises(ValueError, match=f"{'bias' if where == 'bias' else 'scale'} on meta.*move the layer"):
        int8_linear_int8_input(qa, sa, qw, scale, b, torch.bfloat16)
