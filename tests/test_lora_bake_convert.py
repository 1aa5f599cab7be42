"""`headroom convert --lora FILE[:STRENGTH]`: LoRAs merged into the float weights before quantizing."""

import json
import os

import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.kernels.int8 import dequantize_weight, quantize_weight, relative_error
from comfyui_headroom.quant import convert as convert_mod
from comfyui_headroom.quant.convert import ConvertError, convert_file, convert_folder
from comfyui_headroom.quant.formats import parse_int8_layer
from safetensors.torch import load_file, save_file

DIM = 1024
LINEARS = {"blocks.0.attn.qkv": (3 * DIM, DIM), "blocks.0.mlp.fc1": (2 * DIM, DIM), "blocks.1.mlp.fc2": (DIM, 2 * DIM),
           "final_layer.linear": (64, DIM)}  # final_layer stays float (skip pattern): its LoRA merges in float


def _model(gen, prefix=""):
    sd = {f"{prefix}{n}.weight": (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in LINEARS.items()}
    sd[f"{prefix}blocks.0.norm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
    return sd


def _kohya_lora(path, gen, rank=8, alpha=4.0, layers=LINEARS, scale=0.05):
    sd, factors = {}, {}
    for name, (out_f, in_f) in layers.items():
        down = torch.randn(rank, in_f, generator=gen) * scale
        up = torch.randn(out_f, rank, generator=gen) * scale
        base = "lora_unet_" + name.replace(".", "_")
        sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"] = down, up
        sd[base + ".alpha"] = torch.tensor(alpha)
        factors[name] = (down, up, alpha / rank)
    save_file(sd, str(path))
    return path, factors


@pytest.fixture
def files(tmp_path, gen):
    sd = _model(gen)
    src = tmp_path / "model.safetensors"
    save_file(sd, str(src))
    lora, factors = _kohya_lora(tmp_path / "style.safetensors", gen)
    return src, sd, lora, factors


def test_convert_with_lora_equals_quantizing_the_merged_weights(tmp_path, files, monkeypatch):
    src, sd, lora, factors = files
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 500_000)  # merge happens per chunk of rows
    dst = tmp_path / "out.safetensors"
    report = convert_file(src, dst, loras=[f"{lora}:0.7"], progress=False)
    assert report.loras[0]["layers_touched"] == 4 and "style.safetensors x0.7: 4 layers merged" in str(report)
    out = load_file(str(dst))
    for name, (down, up, ratio) in factors.items():
        merged = sd[name + ".weight"].float() + 0.7 * ratio * up @ down
        if name.startswith("final_layer"):
            assert out[name + ".weight"].dtype == torch.bfloat16  # kept in float, LoRA merged
            assert relative_error(out[name + ".weight"].float(), merged) < 5e-3
            continue
        q, scale = quantize_weight(merged, "rowwise")  # the whole merged tensor at once
        assert torch.equal(out[name + ".weight"], q), name  # chunked merge + quantize is bit-identical
        assert torch.equal(out[name + ".weight_scale"], scale)
        assert relative_error(dequantize_weight(q, scale), sd[name + ".weight"].float()) > 0.05  # LoRA visible
    assert torch.equal(out["blocks.0.norm.weight"], sd["blocks.0.norm.weight"])


def test_lora_and_rotation_together(tmp_path, files, gen):
    src, sd, lora, factors = files
    dst = tmp_path / "rot.safetensors"
    convert_file(src, dst, loras=[lora], rotate=256, progress=False)
    out = load_file(str(dst))
    from comfyui_headroom.quant import Int8Linear

    name = "blocks.1.mlp.fc2"
    down, up, ratio = factors[name]
    merged = sd[name + ".weight"].float() + ratio * up @ down
    parsed = parse_int8_layer(out, name + ".", {})
    layer = Int8Linear.from_quantized(parsed.weight, parsed.scale, compute_dtype=torch.float32, rotation_group=256)
    assert parsed.convrot
    assert relative_error(layer.dequantized_weight(), merged) < 0.02


def test_lora_for_another_model_exits_2_and_writes_nothing(tmp_path, files, capsys, gen):
    src, _, _, _ = files
    other, _ = _kohya_lora(tmp_path / "wan.safetensors", gen, layers={"blocks.0.self_attn.q": (DIM, DIM)})
    out = tmp_path / "o.safetensors"
    assert cli.main(["convert", str(src), str(out), "--lora", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "wan.safetensors matches no layer" in err and "lora_unet_blocks_0_self_attn_q" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "headroom-tmp" in p]


def test_lora_shape_mismatch_names_the_layers(tmp_path, files, capsys, gen):
    src, _, _, _ = files
    wrong = {"blocks.0.attn.qkv": (3 * DIM, 512), "blocks.0.mlp.fc1": (2 * DIM, DIM)}
    bad, _ = _kohya_lora(tmp_path / "bad.safetensors", gen, layers=wrong)
    out = tmp_path / "o.safetensors"
    assert cli.main(["convert", str(src), str(out), "--lora", f"{bad}:1.0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn.qkv.weight" in err and "1 layer(s)" in err and not out.exists()
    assert cli.main(["convert", str(src), str(out), "--lora", str(tmp_path / "missing.safetensors"), "--quiet"]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err


def test_cli_repeatable_lora_report(tmp_path, files, capsys, gen):
    src, sd, lora, _ = files
    second, _ = _kohya_lora(tmp_path / "detail.safetensors", gen, layers={"blocks.0.mlp.fc1": (2 * DIM, DIM)})
    out = tmp_path / "o.safetensors"
    assert cli.main(["convert", str(src), str(out), "--lora", f"{lora}:0.5", "--lora", f"{second}:-1",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(os.path.basename(e["lora"]), e["strength"], e["layers_touched"]) for e in report["loras"]] == [
        ("style.safetensors", 0.5, 4), ("detail.safetensors", -1.0, 1)]


def test_folder_with_prefixed_names(tmp_path, gen):
    """A sharded checkpoint whose names carry ComfyUI's model.diffusion_model. prefix; the LoRA has none."""
    folder = tmp_path / "model"
    folder.mkdir()
    sd = _model(gen, prefix="model.diffusion_model.")
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:2]}, str(folder / "a.safetensors"))
    save_file({k: sd[k] for k in keys[2:]}, str(folder / "b.safetensors"))
    lora, factors = _kohya_lora(tmp_path / "l.safetensors", gen)
    report = convert_folder(folder, tmp_path / "out", loras=[lora], progress=False)
    assert report.loras[0]["layers_touched"] == 4
    with pytest.raises(ConvertError, match="matches no layer"):
        other, _ = _kohya_lora(tmp_path / "x.safetensors", gen, layers={"nothing.here": (8, 8)})
        convert_folder(folder, tmp_path / "out2", loras=[other], progress=False)
