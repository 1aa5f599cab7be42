"""Bad LoRA files for ``headroom convert --lora`` (quant/lora_bake.py): quantized LoRAs are dequantized, not merged
as raw integers; damaged values, corrupt alphas, unknown parts and LoRAs that match nothing are errors that name
the LoRA file and tensor; the checkpoint / state dict is never modified."""

import math

import pytest
import torch
from cliutil import cli_user_error, run_cli
from comfyui_headroom.kernels.int8 import quantize_weight
from comfyui_headroom.quant import relative_error
from comfyui_headroom.quant.formats import encode_comfy_quant, parse_int8_layer
from comfyui_headroom.quant.lora_bake import (
    LoraError,
    LoraMerger,
    LoraSpec,
    merge_lora_into_state_dict,
)
from safetensors.torch import load_file, save_file

LAYERS = {"blocks.0.attn.qkv": (192, 64), "blocks.0.mlp.fc1": (256, 64)}


def _checkpoint(gen):
    sd = {f"{name}.weight": torch.randn(*shape, generator=gen).to(torch.bfloat16) for name, shape in LAYERS.items()}
    sd.update({f"{name}.bias": torch.zeros(shape[0], dtype=torch.bfloat16) for name, shape in LAYERS.items()})
    return sd


def _factors(gen, rank=8):
    return {name: (torch.randn(rank, shape[1], generator=gen) * 0.3, torch.randn(shape[0], rank, generator=gen) * 0.3)
            for name, shape in LAYERS.items()}


def _float_lora(path, factors, alpha=4.0, extra=None):
    sd = {}
    for name, (down, up) in factors.items():
        sd[f"diffusion_model.{name}.lora_down.weight"] = down
        sd[f"diffusion_model.{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def _int8_lora(path, factors, method, alpha=4.0):
    """INT8 factors as INT8 LoRA packs ship them: ``<factor>.weight`` int8 + ``<factor>.weight_scale`` (+ the
    ``comfy_quant`` config for ComfyUI's layout)."""
    sd = {}
    for name, (down, up) in factors.items():
        for part, tensor in (("lora_down", down), ("lora_up", up)):
            q, scale = quantize_weight(tensor, "tensorwise" if method == "comfy" else method)
            sd[f"diffusion_model.{name}.{part}.weight"] = q
            sd[f"diffusion_model.{name}.{part}.weight_scale"] = scale
            if method == "comfy":
                sd[f"diffusion_model.{name}.{part}.comfy_quant"] = encode_comfy_quant({"format": "int8_tensorwise"})
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def _unchanged(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def _refused(sd, lora, match):
    """Merging ``lora`` into ``sd`` raises a LoraError matching ``match``, and ``sd`` is as it was."""
    before = dict(sd)
    with pytest.raises(LoraError, match=match):
        merge_lora_into_state_dict(sd, [lora])
    _unchanged(before, sd)


# ---------------------------------------------------------------------------------------------------------
# Quantized LoRAs: dequantized, the same merge as the float LoRA within INT8 error
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rowwise", "tensorwise", "comfy"])
def test_an_int8_lora_merges_like_its_float_original(tmp_path, gen, method):
    sd = _checkpoint(gen)
    factors = _factors(gen)
    from_float, from_int8 = dict(sd), dict(sd)
    merge_lora_into_state_dict(from_float, [_float_lora(tmp_path / "f.safetensors", factors)])
    merger = merge_lora_into_state_dict(from_int8, [_int8_lora(tmp_path / "q.safetensors", factors, method)])
    assert merger.summary()[0]["layers_touched"] == len(LAYERS)
    for name in LAYERS:
        key = f"{name}.weight"
        delta_float = from_float[key].float() - sd[key].float()
        delta_int8 = from_int8[key].float() - sd[key].float()
        assert relative_error(delta_int8, delta_float) < 0.03, (name, relative_error(delta_int8, delta_float))


def test_convert_with_an_int8_lora_writes_the_float_loras_weights(tmp_path, gen):
    src = tmp_path / "model.safetensors"
    sd = _checkpoint(gen)
    save_file(sd, str(src))
    factors = _factors(gen)
    out = {}
    for kind, lora in (("float", _float_lora(tmp_path / "f.safetensors", factors)),
                       ("int8", _int8_lora(tmp_path / "q.safetensors", factors, "rowwise"))):
        dst = tmp_path / f"{kind}.safetensors"
        done = run_cli("convert", src, dst, "--quiet", "--no-default-skips", "--lora", lora, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "2 layers merged" in done.stdout
        out[kind] = load_file(str(dst))
    for name in LAYERS:  # these layers are small, so they stay in float: the file holds the merged weights as such
        assert parse_int8_layer(out["float"], f"{name}.") is None
        base = sd[f"{name}.weight"].float()
        delta_float, delta_int8 = out["float"][f"{name}.weight"].float() - base, out["int8"][f"{name}.weight"].float() - base
        assert relative_error(delta_int8, delta_float) < 0.05, name
        assert relative_error(delta_float, base) > 0.1, name  # the LoRA changed the weights


def test_an_int8_factor_without_its_scale_is_refused(tmp_path, gen):
    factors = _factors(gen)
    q, _ = quantize_weight(factors["blocks.0.attn.qkv"][0], "rowwise")
    lora = _float_lora(tmp_path / "l.safetensors", factors)
    tensors = load_file(str(lora))
    tensors["diffusion_model.blocks.0.attn.qkv.lora_down.weight"] = q  # int8, no weight_scale
    save_file(tensors, str(lora))
    sd = _checkpoint(gen)
    _refused(sd, lora, r"l\.safetensors, tensor 'diffusion_model\.blocks\.0\.attn\.qkv\.lora_down\.weight'.*no scale")


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_a_factor_that_is_not_float_or_int8_is_refused(tmp_path, gen, dtype):
    factors = _factors(gen)
    lora = _float_lora(tmp_path / "l.safetensors", factors)
    tensors = load_file(str(lora))
    key = "diffusion_model.blocks.0.mlp.fc1.lora_up.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(lora))
    with pytest.raises(LoraError, match=rf"tensor '{key}' is {str(dtype).replace('torch.', '')}"):
        merge_lora_into_state_dict(_checkpoint(gen), [lora])


# ---------------------------------------------------------------------------------------------------------
# Damaged values: blamed on the LoRA file and tensor, never on the checkpoint
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("part", ["lora_down", "lora_up"])
def test_nan_or_inf_in_a_lora_names_the_lora_file_and_tensor(tmp_path, gen, bad, part):
    factors = _factors(gen)
    down, up = factors["blocks.0.mlp.fc1"]
    (down if part == "lora_down" else up)[3, 1] = bad
    lora = _float_lora(tmp_path / "damaged.safetensors", factors)
    sd = _checkpoint(gen)
    before = dict(sd)
    kind = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(LoraError, match=rf"damaged\.safetensors, tensor 'diffusion_model\.blocks\.0\.mlp\.fc1\.{part}\.weight' "
                                        rf"contains 1 {kind} value, the first at \[3, 1\]: the LoRA file is damaged"):
        merge_lora_into_state_dict(sd, [lora])
    _unchanged(before, sd)


def test_nan_in_an_int8_loras_scale_is_blamed_on_the_lora(tmp_path, gen):
    lora = _int8_lora(tmp_path / "q.safetensors", _factors(gen), "rowwise")
    tensors = load_file(str(lora))
    tensors["diffusion_model.blocks.0.attn.qkv.lora_up.weight_scale"][5] = float("nan")
    save_file(tensors, str(lora))
    _refused(_checkpoint(gen), lora, r"q\.safetensors, tensor 'diffusion_model\.blocks\.0\.attn\.qkv\.lora_up\.weight' "
                                     r"contains 8 NaN values, the first at \[5, 0\]")


def test_factors_whose_product_overflows_are_blamed_on_the_lora(tmp_path, gen):
    factors = {name: (down * 1e20, up * 1e20) for name, (down, up) in _factors(gen).items()}  # finite, product inf
    lora = _float_lora(tmp_path / "huge.safetensors", factors)
    sd = _checkpoint(gen)
    _refused(sd, lora, r"'blocks\.0\.attn\.qkv\.weight' \+ LoRA huge\.safetensors:1 \('diffusion_model\.blocks\.0\.attn\.qkv'\) "
                       r"gives \d+ inf values, the first at \[0, 0\] \(counting from row 0\)")


def test_a_merge_beyond_the_weights_dtype_range_is_blamed_on_the_lora(tmp_path, gen):
    factors = {name: (down * 1000, up * 1000) for name, (down, up) in _factors(gen).items()}  # ~1e5: above fp16's max
    lora = _float_lora(tmp_path / "strong.safetensors", factors)
    sd = {k: v.to(torch.float16) for k, v in _checkpoint(gen).items()}
    _refused(sd, lora, r"exceeds the range of float16")


def test_nan_in_the_checkpoint_is_still_the_checkpoints(tmp_path, gen):
    """The LoRA is fine, the base weight is not: the merger leaves it to the converter, which names the checkpoint."""
    src = tmp_path / "model.safetensors"
    sd = _checkpoint(gen)
    sd["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(sd, str(src))
    lora = _float_lora(tmp_path / "fine.safetensors", _factors(gen))
    err = cli_user_error("convert", src, tmp_path / "o.safetensors", "--quiet", "--lora", lora, cwd=tmp_path)
    assert "blocks.0.attn.qkv.weight" in err and "source checkpoint" in err and "fine.safetensors" not in err


def test_the_cli_blames_a_nan_lora_in_one_line_and_writes_nothing(tmp_path, gen):
    src = tmp_path / "model.safetensors"
    save_file(_checkpoint(gen), str(src))
    before = src.read_bytes()
    factors = _factors(gen)
    factors["blocks.0.attn.qkv"][1][0, 0] = float("nan")
    lora = _float_lora(tmp_path / "damaged.safetensors", factors)
    dst = tmp_path / "o.safetensors"
    err = cli_user_error("convert", src, dst, "--quiet", "--lora", lora, cwd=tmp_path)
    assert "damaged.safetensors" in err and "diffusion_model.blocks.0.attn.qkv.lora_up.weight" in err
    assert "NaN" in err and "source checkpoint" not in err
    assert not dst.exists() and src.read_bytes() == before


def test_the_cli_blames_an_overflowing_lora_found_in_the_middle_of_the_write(tmp_path, gen):
    src = tmp_path / "model.safetensors"
    save_file(_checkpoint(gen), str(src))
    factors = {name: (down * 1e20, up * 1e20) for name, (down, up) in _factors(gen).items()}
    lora = _float_lora(tmp_path / "huge.safetensors", factors)
    dst = tmp_path / "o.safetensors"
    err = cli_user_error("convert", src, dst, "--quiet", "--lora", lora, cwd=tmp_path)
    assert "huge.safetensors" in err and "too large" in err and "source checkpoint" not in err
    assert not dst.exists() and not list(tmp_path.glob(".o.safetensors*"))


# ---------------------------------------------------------------------------------------------------------
# Corrupt alpha, strength
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, message", [
    (torch.tensor(float("nan")), "is nan, not a finite number"),
    (torch.tensor(float("inf")), "is inf, not a finite number"),
    (torch.ones(3), r"is a float32 tensor of shape \[3\]; expected one number"),
    (torch.empty(0), r"is a float32 tensor of shape \[0\]; expected one number"),
    (torch.tensor(True), r"is a bool tensor of shape \[\]"),
    (encode_comfy_quant({"alpha": 4}), r"is a uint8 tensor of shape \[\d+\]"),
])
def test_a_corrupt_alpha_names_the_file_and_key(tmp_path, gen, alpha, message):
    factors = _factors(gen)
    lora = _float_lora(tmp_path / "a.safetensors", factors, alpha=4.0,
                       extra={"diffusion_model.blocks.0.mlp.fc1.alpha": alpha})
    sd = _checkpoint(gen)
    _refused(sd, lora, rf"a\.safetensors: alpha 'diffusion_model\.blocks\.0\.mlp\.fc1\.alpha' {message}")


def test_an_integer_alpha_is_a_number(tmp_path, gen):
    factors = _factors(gen)
    as_int = _float_lora(tmp_path / "i.safetensors", factors, extra={
        f"diffusion_model.{n}.alpha": torch.tensor(4, dtype=torch.int64) for n in LAYERS})
    a, b = _checkpoint(gen), None
    b = dict(a)
    merge_lora_into_state_dict(a, [as_int])
    merge_lora_into_state_dict(b, [_float_lora(tmp_path / "f.safetensors", factors, alpha=4.0)])
    _unchanged(a, b)


@pytest.mark.parametrize("text", ["l.safetensors:nan", "l.safetensors:inf", "l.safetensors:-inf", "l.safetensors:1e9",
                                  "l.safetensors:-101"])
def test_an_unusable_strength_is_refused(text):
    with pytest.raises(LoraError, match=r"strength .* is not usable; give a number from -100 to 100"):
        LoraSpec.parse(text)


@pytest.mark.parametrize("strength", [True, "0.5", None])
def test_a_strength_that_is_not_a_number_is_refused(strength):
    with pytest.raises(LoraError, match="is not usable"):
        LoraSpec("l.safetensors", strength)


def test_a_bad_strength_on_the_command_line_is_one_line(tmp_path, gen):
    src = tmp_path / "model.safetensors"
    save_file(_checkpoint(gen), str(src))
    lora = _float_lora(tmp_path / "l.safetensors", _factors(gen))
    err = cli_user_error("convert", src, tmp_path / "o.safetensors", "--quiet", "--lora", f"{lora}:nan", cwd=tmp_path)
    assert "strength nan is not usable" in err


# ---------------------------------------------------------------------------------------------------------
# LoRAs that match nothing, apply twice, or carry parts that would be ignored
# ---------------------------------------------------------------------------------------------------------

def test_a_text_encoder_only_lora_is_an_error_not_zero_layers_merged(tmp_path, gen):
    down, up = torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen)
    lora = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up}, str(lora))
    with pytest.raises(LoraError, match=r"te\.safetensors holds only text-encoder weights \(2 keys, e\.g\. lora_te1_"):
        LoraMerger([lora])
    src = tmp_path / "model.safetensors"
    save_file(_checkpoint(gen), str(src))
    err = cli_user_error("convert", src, tmp_path / "o.safetensors", "--quiet", "--lora", lora, cwd=tmp_path)
    assert "only text-encoder weights" in err


def test_a_lora_for_another_model_says_what_both_look_like(tmp_path, gen):
    factors = {"double_blocks.3.img_attn.proj": (torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen))}
    lora = _float_lora(tmp_path / "flux.safetensors", factors)
    src = tmp_path / "model.safetensors"
    save_file(_checkpoint(gen), str(src))
    err = cli_user_error("convert", src, tmp_path / "o.safetensors", "--quiet", "--lora", lora, cwd=tmp_path)
    assert "matches no layer" in err and "double_blocks.3.img_attn.proj" in err and "blocks.0.attn.qkv" in err


def test_two_modules_for_one_layer_are_refused(tmp_path, gen):
    down, up = _factors(gen)["blocks.0.attn.qkv"]
    lora = tmp_path / "twice.safetensors"
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_down.weight": down,
               "diffusion_model.blocks.0.attn.qkv.lora_up.weight": up,
               "lora_unet_blocks_0_attn_qkv.lora_down.weight": down.clone(),
               "lora_unet_blocks_0_attn_qkv.lora_up.weight": up.clone()}, str(lora))
    with pytest.raises(LoraError, match=r"two modules for the checkpoint's 'blocks\.0\.attn\.qkv\.weight'"):
        merge_lora_into_state_dict(_checkpoint(gen), [lora])


@pytest.mark.parametrize("extra_key, message", [
    ("diffusion_model.blocks.0.attn.qkv.lora_up.bias", "parts headroom does not know how to bake"),
    ("diffusion_model.blocks.0.attn.qkv.lora_mid.weight", "Tucker"),
    ("diffusion_model.blocks.0.norm.w_norm", "variant headroom cannot bake"),
])
def test_parts_that_would_be_ignored_are_refused(tmp_path, gen, extra_key, message):
    lora = _float_lora(tmp_path / "l.safetensors", _factors(gen), extra={extra_key: torch.ones(8)})
    with pytest.raises(LoraError, match=message):
        LoraMerger([lora])


def test_rank_zero_is_a_shape_error(tmp_path, gen):
    factors = {"blocks.0.attn.qkv": (torch.zeros(0, 64), torch.zeros(192, 0))}
    lora = _float_lora(tmp_path / "r0.safetensors", factors, alpha=None)
    with pytest.raises(LoraError, match="rank 0"):
        merge_lora_into_state_dict(_checkpoint(gen), [lora])


def test_merging_before_bind_is_an_error(tmp_path, gen):
    merger = LoraMerger([_float_lora(tmp_path / "l.safetensors", _factors(gen))])
    with pytest.raises(LoraError, match=r"call bind\(checkpoint shapes\) before merging"):
        merger.merge_rows("blocks.0.attn.qkv.weight", torch.zeros(192, 64), 0)


# ---------------------------------------------------------------------------------------------------------
# Saving a patched model ("Save INT8 Model"): a patch that breaks a weight is blamed on the patch
# ---------------------------------------------------------------------------------------------------------

def _patched_source(dtype, patch, weight_value=None):
    from torch import nn

    from comfyui_headroom.quant.lora_bake import model_tensor_source

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(dtype)
    if weight_value is not None:
        with torch.no_grad():
            model[1].weight[2, 3] = weight_value
    return model_tensor_source(model, patch, name="TinyModel")


def test_a_patch_that_makes_nan_is_blamed_on_the_patch_not_the_model():
    def patch(key, weight):
        return weight * float("nan") if key == "1.weight" else weight

    source = _patched_source(torch.float32, patch)
    assert torch.isfinite(source["0.weight"]).all()
    with pytest.raises(LoraError, match=r"TinyModel: '1\.weight' gets 4096 NaN values, the first at \[0, 0\], from its "
                                        r"patches \(LoRA\), while the model's own weight is finite"):
        source["1.weight"]


def test_a_model_weight_that_is_already_nan_is_left_to_the_converter():
    source = _patched_source(torch.float32, lambda key, weight: weight, weight_value=float("nan"))
    assert torch.isnan(source["1.weight"][2, 3])


def test_a_patch_beyond_float16_is_blamed_on_the_patch():
    source = _patched_source(torch.float16, lambda key, weight: weight + 1e6 if key == "1.weight" else weight)
    with pytest.raises(LoraError, match=r"TinyModel: '1\.weight' with its patches \(LoRA\) applied exceeds the range "
                                        r"of float16"):
        source["1.weight"]
