"""``headroom inspect``: format, method, layer counts, sizes and VRAM estimates from headers only."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_headroom import cli
from comfyui_headroom.quant.convert import convert_file, convert_folder
from comfyui_headroom.quant.inspection import inspect_path

QUANTIZABLE = {"blocks.0.attn.qkv.weight": (3072, 1024), "blocks.0.mlp.fc1.weight": (2048, 1024),
               "blocks.0.mlp.fc2.weight": (1024, 2048)}
OTHERS = {"blocks.0.attn.qkv.bias": (3072,), "blocks.0.norm.weight": (1024,), "wte.weight": (1000, 1024),
          "final_layer.linear.weight": (16, 1024), "blocks.0.small.weight": (128, 1024)}


@pytest.fixture
def model(tmp_path, gen):
    tensors = {name: (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
               for name, shape in {**QUANTIZABLE, **OTHERS}.items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def _expected_vram():
    quantizable = sum(math.prod(s) for s in QUANTIZABLE.values())
    others = sum(math.prod(s) for s in OTHERS.values())
    rows = sum(s[0] for s in QUANTIZABLE.values())
    return {
        "bf16_bytes": 2 * (quantizable + others),
        "int8_bytes": quantizable + 4 * rows + 2 * others,
        "nf4_bytes": quantizable // 2 + 4 * math.ceil(quantizable / 64) + 2 * others,
    }


def test_float_file(model):
    report = inspect_path(model)
    assert report.info.format == "float" and report.info.method is None
    assert (report.would_quantize, report.would_keep) == (3, 3)
    estimate = report.vram.as_dict()
    for key, value in _expected_vram().items():
        assert estimate[key] == value, key
    text = str(report)
    assert "a default conversion would quantize 3, keep 3 in float" in text
    assert "bf16" in text and "INT8" in text and "NF4" in text


@pytest.mark.parametrize("method", ["rowwise", "block"])
def test_quantized_file_estimates_match_its_source(tmp_path, model, method):
    dst = tmp_path / "int8.safetensors"
    convert_file(model, dst, method=method, progress=False)
    report = inspect_path(dst)
    info = report.info
    assert (info.format, info.method, info.block_size) == ("headroom", method, 128 if method == "block" else None)
    assert len(info.quantized_layers) == 3 and len(info.skipped_layers) == 3
    assert info.total_bytes == dst.stat().st_size
    assert info.dtypes["int8"] == {"tensors": 3, "parameters": sum(math.prod(s) for s in QUANTIZABLE.values()),
                                   "bytes": sum(math.prod(s) for s in QUANTIZABLE.values())}
    expected = _expected_vram()
    estimate = report.vram.as_dict()
    assert estimate["bf16_bytes"] == expected["bf16_bytes"]  # parameters, not the file's bytes
    assert estimate["nf4_bytes"] == expected["nf4_bytes"]
    blocks = sum(s[0] * math.ceil(s[1] / 128) for s in QUANTIZABLE.values())
    scale_bytes = 4 * (blocks if method == "block" else sum(s[0] for s in QUANTIZABLE.values()))
    assert estimate["int8_bytes"] == expected["int8_bytes"] - 4 * sum(s[0] for s in QUANTIZABLE.values()) + scale_bytes


def test_cli_text_and_json(tmp_path, model, capsys):
    dst = tmp_path / "comfy.safetensors"
    convert_file(model, dst, method="tensorwise", layout="comfy", progress=False)
    assert cli.main(["inspect", str(dst)]) == 0
    text = capsys.readouterr().out
    assert "comfy INT8, method tensorwise" in text
    assert "3 quantized, 3 kept in float" in text
    assert "VRAM for weights (estimate)" in text
    assert cli.main(["inspect", str(dst), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "comfy" and data["method"] == "tensorwise"
    assert data["layers_quantized"] == 3 and data["layers_skipped"] == 3
    assert data["total_bytes"] == dst.stat().st_size
    assert data["dtypes"]["uint8"]["tensors"] == 3  # the comfy_quant tensors
    assert data["vram_estimate"]["bf16_bytes"] == _expected_vram()["bf16_bytes"]


def test_folder(tmp_path, model, capsys):
    folder = tmp_path / "repo" / "transformer"
    folder.mkdir(parents=True)
    model.rename(folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text("{}")
    out = tmp_path / "repo-int8"
    convert_folder(tmp_path / "repo", out, progress=False)
    assert cli.main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "headroom" and data["layers_quantized"] == 3
    assert len(data["files"]) == 1
    assert data["total_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_bad_paths_exit_2(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    assert cli.main(["inspect", str(pickle)]) == 2
    err = capsys.readouterr().err
    assert "refuses pickles" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 2
    assert "without any .safetensors" in capsys.readouterr().err
