"""`headroom convert --rotate`: rotated INT8 files, read back through the format reader, chunked = whole."""

import json

import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.kernels.rotation import quantize_rotated
from comfyui_headroom.quant import Int8Linear, relative_error
from comfyui_headroom.quant import convert as convert_mod
from comfyui_headroom.quant.convert import ConvertError, convert_file
from comfyui_headroom.quant.formats import decode_comfy_quant, parse_int8_layer
from comfyui_headroom.quant.rotation import rotation_group_of
from safetensors.torch import load_file, save_file
from testutil import outlier_weight

DIM = 1024


def _state_dict(gen):
    return {
        "blocks.0.attn.qkv.weight": (outlier_weight(3 * DIM, DIM, gen) * 0.02).to(torch.bfloat16),
        "blocks.0.attn.qkv.bias": torch.zeros(3 * DIM, dtype=torch.bfloat16),
        "blocks.0.mlp.fc2.weight": (outlier_weight(DIM, 2 * DIM, gen) * 0.02).to(torch.bfloat16),
        "blocks.0.odd.weight": (torch.randn(DIM, 1152, generator=gen) * 0.02).to(torch.bfloat16),  # 1152 % 256 != 0
        "blocks.0.norm.weight": torch.ones(DIM, dtype=torch.bfloat16),
        "final_layer.linear.weight": torch.randn(64, DIM, generator=gen).to(torch.bfloat16),
    }


@pytest.fixture
def src(tmp_path, gen):
    sd = _state_dict(gen)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return path, sd


def _layer(tensors, metadata, name):
    """What the loaders do: parse the layer, take the rotation from its comfy_quant entry."""
    parsed = parse_int8_layer(tensors, name + ".", metadata)
    group = 0
    if parsed.convrot:
        group = rotation_group_of(decode_comfy_quant(tensors[name + ".comfy_quant"]))
    assert parsed.rotation_group == group  # the format read the group once
    return Int8Linear.from_quantized(parsed.weight, parsed.scale, block_size=parsed.block_size,
                                     compute_dtype=torch.float32, rotation_group=group)


@pytest.mark.parametrize("layout,method,group", [("headroom", "rowwise", 256), ("headroom", "block", 128),
                                                 ("comfy", "rowwise", 64)])
def test_rotated_conversion_reads_back_as_the_same_function(tmp_path, src, layout, method, group, gen):
    path, sd = src
    dst = tmp_path / "out.safetensors"
    report = convert_file(path, dst, method=method, layout=layout, rotate=group, progress=False)
    assert sorted(report.rotated) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc2"] + (["blocks.0.odd"] if 1152 % group == 0 else [])
    assert report.rotation_group == group and f"group {group}" in str(report)
    tensors = load_file(str(dst))
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        metadata = f.metadata()
    assert metadata["headroom.rotation_group"] == str(group)
    x = torch.randn(5, DIM, generator=gen)
    for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.0.odd"):
        layer = _layer(tensors, metadata, name)
        w = sd[name + ".weight"].float()
        expected_group = group if w.shape[1] % group == 0 else 0
        assert layer.rotation_group == expected_group, name
        assert relative_error(layer.dequantized_weight(), w) < 0.02, name
        xin = torch.randn(5, w.shape[1], generator=gen)
        assert relative_error(layer(xin), xin @ w.T) < 0.02, name
    # rotation paid off on the outlier layer: far below plain row-wise error
    plain = convert_file(path, tmp_path / "plain.safetensors", method=method, layout=layout, progress=False)
    assert report.quantized["blocks.0.attn.qkv"] < plain.quantized["blocks.0.attn.qkv"] / 2
    assert "blocks.0.norm.weight" in tensors and tensors["blocks.0.norm.weight"].dtype == torch.bfloat16
    del x


def test_rotated_chunks_are_bit_identical_to_whole_tensor(tmp_path, src, monkeypatch):
    path, sd = src
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 300_000)  # many chunks per weight
    dst = tmp_path / "out.safetensors"
    convert_file(path, dst, rotate=256, progress=False)
    out = load_file(str(dst))
    q, scale = quantize_rotated(sd["blocks.0.attn.qkv.weight"].float(), 256)
    assert torch.equal(out["blocks.0.attn.qkv.weight"], q)
    assert torch.equal(out["blocks.0.attn.qkv.weight_scale"], scale)
    assert json.loads(bytes(out["blocks.0.attn.qkv.comfy_quant"].tolist()))["convrot_groupsize"] == 256


def test_bad_rotation_options(tmp_path, src, capsys):
    path, _ = src
    with pytest.raises(ConvertError, match="group sizes"):
        convert_file(path, tmp_path / "a.safetensors", rotate=100, progress=False)
    with pytest.raises(ConvertError, match="ComfyUI"):
        convert_file(path, tmp_path / "b.safetensors", layout="comfy", rotate=128, progress=False)
    with pytest.raises(ConvertError, match="per output channel"):
        convert_file(path, tmp_path / "c.safetensors", layout="comfy", method="tensorwise", rotate=256, progress=False)
    assert cli.main(["convert", str(path), str(tmp_path / "d.safetensors"), "--rotate", "48", "--quiet"]) == 2
    assert "--rotate 48" in capsys.readouterr().err
    assert not list(tmp_path.glob("[abcd].safetensors"))


def test_cli_rotate_default_group(tmp_path, src, capsys):
    path, _ = src
    out = tmp_path / "r.safetensors"
    assert cli.main(["convert", str(path), str(out), "--json", "--rotate"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rotation_group"] == 256 and report["layers_rotated"] == 2
