"""``headroom inspect``: a rotated file says so (our layout and ComfyUI's, with the group), and a folder holding
separate checkpoints - a bf16 model next to its INT8 conversion - is reported file by file, not summed."""

import json

import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.quant.convert import convert_file
from comfyui_headroom.quant.formats import detect_format, parse_int8_layer
from comfyui_headroom.quant.safetensors_stream import FormatError, TensorReader
from safetensors.torch import save_file


@pytest.fixture
def model(tmp_path, gen):
    tensors = {"blocks.0.attn.qkv.weight": torch.randn(3072, 1024, generator=gen),
               "blocks.0.mlp.fc1.weight": torch.randn(1024, 1088, generator=gen),  # 1088: not a multiple of 256
               "blocks.0.norm.weight": torch.ones(1024)}
    path = tmp_path / "model.safetensors"
    save_file({k: (v * 0.02).to(torch.bfloat16) for k, v in tensors.items()}, str(path))
    return path


def _inspect(capsys, path):
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


def test_rotated_files_say_so_with_their_group(tmp_path, capsys, model):
    ours = tmp_path / "ours.safetensors"
    convert_file(model, ours, rotate=64, progress=False)
    text, data = _inspect(capsys, ours)
    assert "format      headroom INT8 (Hadamard-rotated, group 64), method rowwise" in text
    assert data["format"] == "headroom" and data["rotation_groups"] == {"64": 2}
    assert data["label"] == "headroom INT8 (Hadamard-rotated, group 64)"
    with TensorReader(ours) as reader:  # read as ours: the header names the layout, the marker the group
        parsed = parse_int8_layer(reader, "blocks.0.attn.qkv.", reader.header.metadata)
    assert (parsed.source_format, parsed.rotation_group) == ("headroom", 64)

    partly = tmp_path / "partly.safetensors"
    convert_file(model, partly, rotate=256, progress=False)
    text, data = _inspect(capsys, partly)
    assert "headroom INT8 (Hadamard-rotated, group 256: 1 of 2 layers)" in text

    comfy = tmp_path / "comfy.safetensors"
    convert_file(model, comfy, rotate=64, layout="comfy", progress=False)
    text, data = _inspect(capsys, comfy)
    assert "format      comfy INT8 (Hadamard-rotated, group 64), method rowwise" in text
    plain = tmp_path / "plain.safetensors"
    convert_file(model, plain, progress=False)
    text, data = _inspect(capsys, plain)
    assert "format      headroom INT8, method rowwise" in text and data["rotation_groups"] == {}


def test_a_bf16_model_next_to_its_int8_conversion_is_two_models(tmp_path, capsys, model):
    folder = tmp_path / "models"
    folder.mkdir()
    model.rename(folder / "model.safetensors")
    convert_file(folder / "model.safetensors", folder / "model-int8-rowwise.safetensors", progress=False)
    text, data = _inspect(capsys, folder)
    assert text.startswith(f"note: {folder} holds 2 separate checkpoints")
    assert f"{folder / 'model.safetensors'}\n  format      float (not quantized)" in text
    assert f"{folder / 'model-int8-rowwise.safetensors'}\n  format      headroom INT8, method rowwise" in text
    models = {m["path"]: m for m in data["separate_models"]}
    bf16, int8 = models[str(folder / "model.safetensors")], models[str(folder / "model-int8-rowwise.safetensors")]
    assert (bf16["format"], int8["format"]) == ("float", "headroom")
    assert int8["parameters"] == bf16["parameters"] + 3072 + 1024  # + the row scales: nothing summed across files
    with pytest.raises(FormatError, match="holds 2 separate checkpoints.*headroom inspect"):
        detect_format(folder)


def test_two_float_models_with_the_same_names(tmp_path, capsys, model):
    folder = tmp_path / "models"
    folder.mkdir()
    model.rename(folder / "a.safetensors")
    save_file({"blocks.0.norm.weight": torch.zeros(1024)}, str(folder / "b.safetensors"))  # float32, same name
    _, data = _inspect(capsys, folder)
    assert [m["files"] for m in data["separate_models"]] == [[str(folder / "a.safetensors")],
                                                             [str(folder / "b.safetensors")]]


def test_shards_and_components_are_still_one_model(tmp_path, capsys, gen):
    folder = tmp_path / "pipeline"
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    for i in (1, 2):  # shards without an index: disjoint names
        save_file({f"blocks.{i}.weight": torch.randn(1024, 1024, generator=gen)},
                  str(folder / "transformer" / f"model-0000{i}-of-00002.safetensors"))
    save_file({"blocks.1.weight": torch.randn(8, 8, generator=gen)}, str(folder / "vae" / "model.safetensors"))
    _, data = _inspect(capsys, folder)  # the vae repeats a name, but in its own component folder
    assert "separate_models" not in data and len(data["files"]) == 3
    assert data["parameters"] == 2 * 1024 * 1024 + 64


def test_a_stray_file_next_to_indexed_shards(tmp_path, capsys, gen):
    folder = tmp_path / "model"
    folder.mkdir()
    weight_map = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({f"blocks.{i}.weight": torch.randn(1024, 1024, generator=gen)}, str(folder / name))
        weight_map[f"blocks.{i}.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, data = _inspect(capsys, folder)
    assert "separate_models" not in data and len(data["files"]) == 2
    save_file({"lora_up.weight": torch.randn(8, 8, generator=gen)}, str(folder / "extra.safetensors"))
    _, data = _inspect(capsys, folder)
    assert [len(m["files"]) for m in data["separate_models"]] == [2, 1]
    assert "holds 2 separate checkpoints" in data["notes"][0]
