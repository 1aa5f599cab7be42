"""Baking float LoRAs into weights before INT8 quantization: key styles, alpha, strength, errors, agreement
with the runtime side branch of Int8Linear."""

import pytest
import torch
from safetensors.torch import save_file

from comfyui_headroom.quant import Int8Linear, relative_error
from comfyui_headroom.quant.lora_bake import LoraError, LoraMerger, LoraSpec, merge_lora_into_state_dict

# A Flux-like diffusion transformer's names (ComfyUI's own state-dict names), tiny shapes.
LAYERS = {
    "double_blocks.0.img_attn.qkv": (192, 64),
    "double_blocks.0.img_mlp.0": (256, 64),
    "single_blocks.1.linear1": (128, 64),
}


def _checkpoint(gen, prefix=""):
    sd = {}
    for name, shape in LAYERS.items():
        sd[f"{prefix}{name}.weight"] = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        sd[f"{prefix}{name}.bias"] = torch.randn(shape[0], generator=gen).to(torch.bfloat16)
    sd[f"{prefix}final_layer.norm.weight"] = torch.ones(64)
    return sd


def _factors(gen, rank=4):
    return {name: (torch.randn(rank, shape[1], generator=gen) * 0.4, torch.randn(shape[0], rank, generator=gen) * 0.4)
            for name, shape in LAYERS.items()}


def _lora_file(path, factors, style, alpha=None, extra=None):
    sd = {}
    for name, (down, up) in factors.items():
        if style == "kohya":
            base, d, u = "lora_unet_" + name.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        elif style == "comfy":
            base, d, u = "diffusion_model." + name, ".lora_down.weight", ".lora_up.weight"
        elif style == "peft":
            base, d, u = "transformer." + name, ".lora_A.weight", ".lora_B.weight"
        else:
            base, d, u = name, ".lora_A.weight", ".lora_B.weight"
        sd[base + d] = down.to(torch.bfloat16)
        sd[base + u] = up.to(torch.bfloat16)
        if alpha is not None:
            sd[base + ".alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def _expected(sd, factors, strength, alpha, prefix=""):
    out = {}
    for name, (down, up) in factors.items():
        rank = down.shape[0]
        scale = strength * (alpha / rank if alpha is not None else 1.0)
        w = sd[f"{prefix}{name}.weight"].float()
        out[name] = w + scale * up.to(torch.bfloat16).float() @ down.to(torch.bfloat16).float()
    return out


@pytest.mark.parametrize("style,prefix", [("kohya", ""), ("comfy", ""), ("peft", ""), ("plain", ""),
                                          ("kohya", "model.diffusion_model."), ("peft", "model.diffusion_model.")])
def test_every_key_style_merges_the_same_delta(tmp_path, gen, style, prefix):
    sd = _checkpoint(gen, prefix)
    original = {k: v.clone() for k, v in sd.items()}
    factors = _factors(gen)
    lora = _lora_file(tmp_path / "l.safetensors", factors, style, alpha=2.0)
    merger = merge_lora_into_state_dict(sd, [LoraSpec(lora, 0.8)])
    expected = _expected(original, factors, 0.8, 2.0, prefix)
    for name in LAYERS:
        merged = sd[f"{prefix}{name}.weight"]
        assert merged.dtype == torch.bfloat16
        assert relative_error(merged.float(), expected[name]) < 5e-3  # bf16 rounding of the result only
        assert relative_error(merged.float(), original[f"{prefix}{name}.weight"].float()) > 0.05
    assert torch.equal(sd[f"{prefix}final_layer.norm.weight"], original[f"{prefix}final_layer.norm.weight"])
    assert merger.summary()[0]["layers_touched"] == 3


def test_alpha_defaults_to_rank_and_loras_add_up(tmp_path, gen):
    sd = _checkpoint(gen)
    base = {k: v.float() for k, v in sd.items()}
    f1, f2 = _factors(gen, rank=4), _factors(gen, rank=8)
    a = _lora_file(tmp_path / "a.safetensors", f1, "kohya")  # no alpha: scale 1
    b = _lora_file(tmp_path / "b.safetensors", f2, "peft", alpha=4.0)  # alpha 4 / rank 8
    merger = LoraMerger([f"{a}:1.5", str(b)])
    merger.bind({k: tuple(v.shape) for k, v in sd.items()})
    name = "double_blocks.0.img_mlp.0"
    key = name + ".weight"
    merged = merger.merge_rows(key, base[key].clone(), 0)
    d1, u1 = (t.to(torch.bfloat16).float() for t in f1[name])
    d2, u2 = (t.to(torch.bfloat16).float() for t in f2[name])
    expected = base[key] + 1.5 * u1 @ d1 + 0.5 * u2 @ d2
    assert torch.allclose(merged, expected, atol=1e-5)
    # chunks of rows (what the streaming converter feeds) give exactly the whole-tensor result
    chunks = [merger.merge_rows(key, base[key][s:s + 100].clone(), s) for s in range(0, 256, 100)]
    assert torch.equal(torch.cat(chunks), merged)
    assert [e["layers_touched"] for e in merger.summary()] == [3, 3]


def test_strength_parsing():
    assert LoraSpec.parse("style.safetensors:0.6") == LoraSpec(__import__("pathlib").Path("style.safetensors"), 0.6)
    assert LoraSpec.parse("style.safetensors").strength == 1.0
    assert LoraSpec.parse("C:\\loras\\x.safetensors").path.name.endswith("x.safetensors")
    assert LoraSpec.parse("C:\\loras\\x.safetensors:-0.5").strength == -0.5
    assert LoraSpec.parse("weird:name.safetensors").strength == 1.0


def test_a_lora_for_another_model_is_refused_with_examples(tmp_path, gen):
    sd = _checkpoint(gen)
    other = {"blocks.0.attn.to_q": (torch.randn(4, 64), torch.randn(64, 4))}
    lora = _lora_file(tmp_path / "wan_style.safetensors", other, "peft")
    with pytest.raises(LoraError, match=r"wan_style\.safetensors matches no layer.*blocks\.0\.attn\.to_q.*double_blocks"):
        merge_lora_into_state_dict(sd, [lora])


def test_shape_mismatch_lists_the_layers(tmp_path, gen):
    sd = _checkpoint(gen)
    factors = _factors(gen)
    factors["single_blocks.1.linear1"] = (torch.randn(4, 32), torch.randn(128, 4))  # in 32 != 64
    factors["double_blocks.0.img_mlp.0"] = (torch.randn(4, 64), torch.randn(512, 4))  # out 512 != 256
    lora = _lora_file(tmp_path / "big.safetensors", factors, "comfy")
    with pytest.raises(LoraError, match=r"2 layer\(s\).*double_blocks\.0\.img_mlp\.0\.weight.*single_blocks\.1\.linear1\.weight"):
        merge_lora_into_state_dict(sd, [lora])


def test_text_encoder_keys_are_ignored_and_partial_matches_reported(tmp_path, gen):
    sd = _checkpoint(gen)
    factors = _factors(gen)
    factors["double_blocks.7.not_here"] = (torch.randn(4, 64), torch.randn(64, 4))
    extra = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 4)}
    lora = _lora_file(tmp_path / "mixed.safetensors", factors, "kohya", alpha=4.0, extra=extra)
    merger = merge_lora_into_state_dict(sd, [lora])
    summary = merger.summary()[0]
    assert summary["layers_touched"] == 3 and summary["ignored_text_encoder_keys"] == 2
    assert summary["unmatched_modules"] == 1 and "not_here" in summary["unmatched_examples"][0]
    assert "3 layers merged" in merger.summary_lines()[0]


def test_unsupported_variants_and_bad_files_are_refused(tmp_path, gen):
    dora = _lora_file(tmp_path / "dora.safetensors", _factors(gen), "comfy",
                      extra={"diffusion_model.double_blocks.0.img_attn.qkv.dora_scale": torch.ones(192, 1)})
    with pytest.raises(LoraError, match="DoRA"):
        LoraMerger([dora])
    half = tmp_path / "half.safetensors"
    save_file({"diffusion_model.x.lora_down.weight": torch.randn(4, 8)}, str(half))
    with pytest.raises(LoraError, match="without both down and up"):
        LoraMerger([half])
    not_lora = tmp_path / "model.safetensors"
    save_file({"blocks.0.weight": torch.randn(4, 4)}, str(not_lora))
    with pytest.raises(LoraError, match="contains no LoRA weights"):
        LoraMerger([not_lora])
    with pytest.raises(ValueError, match="does not exist"):
        LoraMerger([tmp_path / "missing.safetensors"])


@pytest.mark.parametrize("rotation_group", [0, 64])
def test_merged_then_quantized_agrees_with_runtime_side_branch(tmp_path, gen, rotation_group):
    """Baking a LoRA then quantizing == quantized base + the LoRA as a float side branch, within INT8 error."""
    out_f, in_f, rank, alpha, strength = 512, 1024, 16, 8.0, 0.9
    base = torch.randn(out_f, in_f, generator=gen) * 0.02
    down = torch.randn(rank, in_f, generator=gen) * 0.05
    up = torch.randn(out_f, rank, generator=gen) * 0.05
    lora = tmp_path / "l.safetensors"
    save_file({"diffusion_model.blocks.0.ff.lora_down.weight": down, "diffusion_model.blocks.0.ff.lora_up.weight": up,
               "diffusion_model.blocks.0.ff.alpha": torch.tensor(alpha)}, str(lora))
    sd = {"blocks.0.ff.weight": base.clone()}
    merge_lora_into_state_dict(sd, [LoraSpec(lora, strength)])

    linear = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        linear.weight.copy_(sd["blocks.0.ff.weight"])
    baked = Int8Linear.from_linear(linear, compute_dtype=torch.float32, rotation_group=rotation_group)
    with torch.no_grad():
        linear.weight.copy_(base)
    side = Int8Linear.from_linear(linear, compute_dtype=torch.float32, rotation_group=rotation_group)
    side.lora = [(down, up, strength * alpha / rank)]

    x = torch.randn(8, in_f, generator=gen)
    exact = x @ (base + strength * alpha / rank * up @ down).T
    with torch.no_grad():
        y_baked, y_side = baked(x), side(x)
    assert relative_error(y_baked, exact) < 0.02
    assert relative_error(y_side, exact) < 0.02
    assert relative_error(y_baked, y_side) < 0.03
    # and the LoRA really changed the output (the test could fail)
    assert relative_error(x @ base.T, exact) > 0.05
