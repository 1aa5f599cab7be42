"""Bad inputs to the library's quantization entry points (quant/replace.py, quant/skip.py): NaN/inf weights and
options out of range are clear errors naming the layer or value, and the model is left exactly as it was."""

import math

import pytest
import torch
from comfyui_headroom.quant import Int8Linear, quantize_model
from comfyui_headroom.quant.replace import QuantizeError
from comfyui_headroom.quant.report import nonfinite
from comfyui_headroom.quant.skip import resolve_patterns
from torch import nn


def _model(gen):
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList([nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024))
                                              for _ in range(2)]))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, snapshot):
    state, types = snapshot
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value) or (value.isnan() == now[key].isnan()).all(), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["rowwise", "block", "tensorwise"])
@pytest.mark.parametrize("part", ["weight", "bias"])
def test_nan_or_inf_weights_are_refused_naming_the_layer(gen, bad, method, part):
    model = _model(gen)
    with torch.no_grad():
        tensor = getattr(model.blocks[1][2], part)
        tensor.view(-1)[7] = bad
    snapshot = _snapshot(model)
    kind = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(QuantizeError, match=rf"blocks\.1\.2\.{part} has 1 {kind} value, the first at "
                                            r"\[(0, 7|7)\]\..*the model is unchanged"):
        quantize_model(model, method)
    _assert_unchanged(model, snapshot)  # blocks.0 (clean, and first) was not replaced either


def test_a_damaged_layer_that_is_skipped_is_not_quantized_and_not_refused(gen):
    model = _model(gen)
    with torch.no_grad():
        model.blocks[0][0].weight[0, 0] = float("nan")
    report = quantize_model(model, skip=["blocks.0.0"])
    assert "blocks.0.0" in report.skipped and type(model.blocks[0][0]) is nn.Linear
    assert isinstance(model.blocks[1][0], Int8Linear)


@pytest.mark.parametrize("options, message", [
    ({"method": "rowwse"}, r"method='rowwse': choose one of rowwise, block, tensorwise"),
    ({"method": "block", "block_size": 0}, r"block_size=0: expected a whole number >= 1"),
    ({"method": "block", "block_size": -128}, r"block_size=-128"),
    ({"block_size": 0}, r"block_size=0"),  # rowwise ignored it, quantized, and failed at the first forward
    ({"block_size": 64.0}, r"block_size=64.0"),
    ({"min_features": -1}, r"min_features=-1: expected a whole number >= 0"),
    ({"min_features": float("nan")}, r"min_features=nan"),
    ({"compute_dtype": torch.int8}, r"compute_dtype=torch.int8: expected None .* or a float torch.dtype"),
    ({"compute_dtype": "bfloat16"}, r"compute_dtype='bfloat16'"),
])
def test_options_out_of_range_are_refused_before_anything_changes(gen, options, message):
    model = _model(gen)
    snapshot = _snapshot(model)
    with pytest.raises(QuantizeError, match=message):
        quantize_model(model, **options)
    _assert_unchanged(model, snapshot)


def test_not_a_module_is_refused():
    with pytest.raises(QuantizeError, match="needs a torch.nn.Module, got dict"):
        quantize_model({"weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("skip, message", [
    (5, "expected a list of strings or one comma-separated string, got int 5"),
    ([None], "must be strings"),
    (["attn", 3], "must be strings"),
])
def test_skip_patterns_that_are_not_strings_are_refused(gen, skip, message):
    model = _model(gen)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize_model(model, skip=skip)
    _assert_unchanged(model, snapshot)


def test_a_lone_dollar_does_not_keep_every_layer_in_float(gen):
    """``$`` alone would be "names ending in nothing" - every name: dropped like an empty pattern."""
    assert resolve_patterns("attn, $ ,", keep_default_skips=False) == ["attn"]
    model = _model(gen)
    report = quantize_model(model, skip=["$"])
    assert len(report.quantized) == 4


def test_nonfinite_says_what_and_where():
    assert nonfinite(torch.zeros(3, 3)) is None and nonfinite(torch.zeros(0)) is None
    assert nonfinite(torch.zeros(3, dtype=torch.int8)) is None
    t = torch.zeros(4, 5, dtype=torch.bfloat16)
    t[2, 3] = float("inf")
    t[3, 0] = float("nan")
    assert nonfinite(t) == "1 NaN and 1 inf values, the first at [2, 3]"
    t = torch.zeros(2, 2).to(torch.float8_e5m2)
    t[1, 1] = float("-inf")
    assert nonfinite(t) == "1 inf value, the first at [1, 1]"
