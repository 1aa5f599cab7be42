"""Int8Linear: drop-in behaviour, .to() and state_dict round trips, quantize_model and skips."""

import pytest
import torch
from torch import nn

from comfyui_headroom.quant import DEFAULT_SKIP_PATTERNS, Int8Linear, dtype_report, quantize_model, relative_error


@pytest.mark.parametrize("method", ["rowwise", "block", "tensorwise"])
def test_matches_nn_linear(method, gen):
    lin = nn.Linear(1024, 1536)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1536, 1024, generator=gen) * 0.02)
    x = torch.randn(2, 7, 1024, generator=gen)
    q = Int8Linear.from_linear(lin, method, compute_dtype=torch.float32)
    with torch.no_grad():
        err = relative_error(q(x), lin(x))
    assert err < 0.02
    assert q.weight.dtype == torch.int8 and q.method == method


def test_dtype_casts_keep_int8_and_float32_scale(gen):
    q = Int8Linear.from_linear(nn.Linear(1024, 1024))
    q.to(torch.float16)
    assert q.weight.dtype == torch.int8
    assert q.weight_scale.dtype == torch.float32
    assert q.bias.dtype == torch.float16
    q.half().float()
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32


def test_to_device_roundtrip_keeps_outputs(gen):
    q = Int8Linear.from_linear(nn.Linear(1024, 1024), compute_dtype=torch.float32)
    x = torch.randn(3, 1024, generator=gen)
    before = q(x)
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    q.to("meta")
    assert q.weight.device.type == "meta" and q.weight_scale.device.type == "meta"
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    q.to_empty(device="cpu")
    q.load_state_dict(saved)
    assert torch.equal(q(x), before)


def test_state_dict_roundtrip_into_a_fresh_module(gen):
    src = Int8Linear.from_linear(nn.Linear(1024, 1024), compute_dtype=torch.float32)
    assert set(src.state_dict()) == {"weight", "weight_scale", "bias"}
    fresh = Int8Linear(1024, 1024, compute_dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    x = torch.randn(3, 1024, generator=gen)
    assert torch.equal(fresh(x), src(x))


@pytest.mark.parametrize("source,target", [("block", "rowwise"), ("tensorwise", "rowwise"), ("rowwise", "block")])
def test_load_state_dict_adopts_the_file_layout(source, target, gen):
    lin = nn.Linear(1024, 1024)
    src = Int8Linear.from_linear(lin, source, compute_dtype=torch.float32)
    dst = Int8Linear(1024, 1024, method=target, compute_dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    assert dst.method == source
    x = torch.randn(2, 1024, generator=gen)
    assert torch.equal(dst(x), src(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv_proj = nn.Linear(1024, 3072)
        self.mlp = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
        self.norm = nn.LayerNorm(1024)
        self.small = nn.Linear(1024, 64)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(1024, 1024)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.final_layer = nn.Linear(1024, 1024)
        self.vae = nn.Module()
        self.vae.decoder = nn.Linear(1024, 1024)


def test_quantize_model_honours_patterns_and_shapes():
    model = Tiny()
    report = quantize_model(model, skip=["mlp.2"])
    assert isinstance(model.blocks[0].attn.qkv_proj, Int8Linear)
    assert isinstance(model.blocks[1].mlp[0], Int8Linear)
    assert isinstance(model.blocks[0].mlp[2], nn.Linear) and not isinstance(model.blocks[0].mlp[2], Int8Linear)
    for kept in (model.patch_embed, model.final_layer, model.vae.decoder, model.blocks[0].small):
        assert type(kept) is nn.Linear
    assert report.skipped["blocks.0.small"].startswith("shape")
    assert report.skipped["patch_embed"] == "pattern 'patch_embed'"
    assert set(report.quantized) == {f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.qkv_proj", "mlp.0")}
    assert report.leaks == []
    assert "int8" in report.dtypes and "float32" in report.dtypes


def test_block_method_skips_indivisible_layers():
    model = nn.Sequential(nn.Linear(1100, 1024), nn.Linear(1024, 1024))
    report = quantize_model(model, method="block", block_size=128)
    assert "0" in report.skipped and "divisible" in report.skipped["0"]
    assert isinstance(model[1], Int8Linear) and model[1].method == "block"


def test_report_flags_a_skip_that_leaked():
    model = Tiny()
    quantize_model(model, keep_default_skips=False)
    assert isinstance(model.vae.decoder, Int8Linear)
    report = dtype_report(model, DEFAULT_SKIP_PATTERNS)
    assert "vae.decoder" in report.leaks and "final_layer" in report.leaks
    assert "WARNING" in str(report)
