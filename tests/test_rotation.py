"""Hadamard rotation (ComfyUI "convrot" convention): the math, the quality gain, Int8Linear holding a rotated weight."""

import pytest
import torch
from comfyui_headroom.kernels.rotation import (
    check_group,
    hadamard,
    quantize_rotated,
    rotate_activation,
    rotate_weight,
    unrotate_weight,
)
from comfyui_headroom.quant import Int8Linear, dequantize_weight, quantize_weight, relative_error
from comfyui_headroom.quant.rotation import comfy_quant_config, rotation_group_of
from testutil import outlier_weight
from torch import nn


@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])
def test_hadamard_is_orthonormal_symmetric_and_flat(group):
    h = hadamard(group).double()
    assert torch.allclose(h @ h.T, torch.eye(group, dtype=torch.float64), atol=1e-6)
    assert torch.equal(h, h.T)  # symmetric: H is its own inverse, which the convrot layout relies on
    assert torch.allclose(h.abs(), torch.full_like(h, group ** -0.5))


def test_hadamard_follows_comfy_kitchens_regular_construction():
    # comfy-kitchen's H4 (not Sylvester's [[1,1],[1,-1]] powers): its files only decode with this matrix.
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(hadamard(16) * 4, torch.kron(h4, h4))
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    s16 = torch.kron(torch.kron(sylvester, sylvester), torch.kron(sylvester, sylvester))
    assert not torch.equal(hadamard(16) * 4, s16)


def test_bad_groups_are_refused():
    for bad in (0, 8, 48, 512):
        with pytest.raises(ValueError, match="group sizes"):
            check_group(bad)
    with pytest.raises(ValueError, match="ComfyUI"):
        comfy_quant_config(128)  # comfy-kitchen cannot build a 128 matrix
    with pytest.raises(ValueError, match="multiple of the rotation group"):
        rotate_weight(torch.randn(4, 100), 64)


@pytest.mark.parametrize("group", [16, 128, 256])
def test_rotating_both_sides_keeps_the_product(group, gen):
    w = torch.randn(48, 512, generator=gen, dtype=torch.float64).float()
    x = torch.randn(3, 5, 512, generator=gen)
    y = x @ w.T
    y_rot = rotate_activation(x, group) @ rotate_weight(w, group).T
    assert relative_error(y_rot, y) < 1e-5
    assert relative_error(rotate_weight(w, group), w) > 0.5  # it really moved
    assert relative_error(unrotate_weight(rotate_weight(w, group), group), w) < 1e-6


def test_rotation_shrinks_the_error_on_outlier_channels(gen):
    w = outlier_weight(1024, 1024, gen)
    plain = relative_error(dequantize_weight(*quantize_weight(w, "rowwise")), w)
    q, s = quantize_rotated(w, 256)
    rotated = relative_error(unrotate_weight(dequantize_weight(q, s), 256), w)
    assert rotated < plain / 4, (rotated, plain)
    # without outliers rotation is neutral: it must not make ordinary weights worse
    g = torch.randn(1024, 1024, generator=gen)
    plain_g = relative_error(dequantize_weight(*quantize_weight(g, "rowwise")), g)
    q, s = quantize_rotated(g, 256)
    assert relative_error(unrotate_weight(dequantize_weight(q, s), 256), g) < plain_g * 1.1


def test_comfy_quant_config_roundtrip():
    assert rotation_group_of(comfy_quant_config(64)) == 64
    assert rotation_group_of({"format": "int8_tensorwise"}) == 0
    assert rotation_group_of({"format": "int8_tensorwise", "convrot": True}) == 256  # ComfyUI's default
    nested = {"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": 16}}
    assert rotation_group_of(nested) == 16
    with pytest.raises(ValueError):
        rotation_group_of({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 100})
    assert rotation_group_of(comfy_quant_config(128, comfy=False)) == 128  # our files may use 128


def _outlier_linear(gen, in_features=1024, out_features=512):
    lin = nn.Linear(in_features, out_features)
    with torch.no_grad():
        lin.weight.copy_(outlier_weight(out_features, in_features, gen) * 0.02)
    return lin


@pytest.mark.parametrize("method", ["rowwise", "block"])
def test_rotated_int8linear_beats_plain_on_outliers(method, gen):
    lin = _outlier_linear(gen)
    x = torch.randn(4, 9, 1024, generator=gen)
    plain = Int8Linear.from_linear(lin, method, compute_dtype=torch.float32)
    rotated = Int8Linear.from_linear(lin, method, compute_dtype=torch.float32, rotation_group=256)
    with torch.no_grad():
        ref = lin(x)
        err_plain, err_rot = relative_error(plain(x), ref), relative_error(rotated(x), ref)
    assert rotated.rotation_group == 256 and "rotation_group=256" in repr(rotated)
    assert err_rot < 0.02
    if method == "rowwise":
        assert err_rot < err_plain / 2, (err_rot, err_plain)
    # the stored weight is rotated; dequantized_weight() gives the plain one back
    assert relative_error(rotated.dequantized_weight(), lin.weight.detach()) < 0.02
    as_if_plain = dequantize_weight(rotated.weight, rotated.weight_scale)
    assert relative_error(as_if_plain, lin.weight.detach()) > 0.5


def test_rotated_state_dict_carries_the_group_and_loads_into_a_fresh_layer(gen):
    lin = _outlier_linear(gen)
    src = Int8Linear.from_linear(lin, compute_dtype=torch.float32, rotation_group=64)
    sd = src.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "rotation_group"}
    assert int(sd["rotation_group"]) == 64
    fresh = Int8Linear(1024, 512, compute_dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 1024, generator=gen)
    assert fresh.rotation_group == 64 and torch.equal(fresh(x), src(x))
    # loading a plain state dict into a rotated layer makes it plain again
    plain = Int8Linear.from_linear(lin, compute_dtype=torch.float32)
    fresh.load_state_dict(plain.state_dict())
    assert fresh.rotation_group == 0 and torch.equal(fresh(x), plain(x))


def test_rotated_layer_survives_device_and_dtype_moves(gen):
    q = Int8Linear.from_linear(_outlier_linear(gen), compute_dtype=torch.float32, rotation_group=256)
    x = torch.randn(2, 1024, generator=gen)
    before = q(x)
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    q.to("meta").to_empty(device="cpu")
    assert q.rotation_group == 256
    q.load_state_dict(saved)
    assert torch.equal(q(x), before)
    q.half().float()
    assert q.rotation_group == 256 and q.weight.dtype == torch.int8


def test_from_quantized_with_rotation_and_bad_group(gen):
    w = torch.randn(64, 256, generator=gen)
    qw, scale = quantize_rotated(w, 256)
    layer = Int8Linear.from_quantized(qw, scale, compute_dtype=torch.float32, rotation_group=256)
    x = torch.randn(5, 256, generator=gen)
    assert relative_error(layer(x), x @ w.T) < 0.02
    with pytest.raises(ValueError, match="does not divide"):
        Int8Linear.from_quantized(torch.zeros(8, 96, dtype=torch.int8), torch.ones(8), rotation_group=64)


def test_lora_side_branch_sees_the_plain_input_on_a_rotated_layer(gen):
    lin = _outlier_linear(gen)
    q = Int8Linear.from_linear(lin, compute_dtype=torch.float32, rotation_group=256)
    down = torch.randn(8, 1024, generator=gen) * 0.02
    up = torch.randn(512, 8, generator=gen) * 0.02
    q.lora = [(down, up, 0.7)]
    x = torch.randn(6, 1024, generator=gen)
    with torch.no_grad():
        expected = lin(x) + 0.7 * (x @ down.T) @ up.T
        assert relative_error(q(x), expected) < 0.02


def test_rotated_layer_compiles_as_one_op_and_its_gradient_is_right(gen):
    """Under torch.compile a rotated layer is the custom op headroom.rotated_int8_linear (no graph break, the
    fused kernel stays usable at run time), and its autograd formula matches the float computation."""
    layer = Int8Linear.from_linear(torch.nn.Linear(128, 48).requires_grad_(False), rotation_group=64)
    block = torch.nn.Sequential(torch.nn.LayerNorm(128), layer, torch.nn.GELU())
    x = torch.randn(2, 5, 128, generator=gen)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graphs[0].code.count("headroom.rotated_int8_linear") == 1
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))

    xg = torch.randn(3, 128, generator=gen, requires_grad=True)
    layer(xg).square().sum().backward()
    x2 = xg.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, layer.dequantized_weight(), layer.bias.float())  # plain-basis weight
    y2.square().sum().backward()
    assert relative_error(xg.grad, x2.grad) < 0.02  # the activation is INT8 in one, float in the other
    layer.rotation_group = 0  # a gradient that ignored the rotation would be far off
    x3 = xg.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x3, layer.dequantized_weight(), layer.bias.float()).square().sum().backward()
    assert relative_error(x3.grad, x2.grad) > 0.3
