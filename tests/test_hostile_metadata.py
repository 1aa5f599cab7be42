"""Corrupt or hostile metadata: our ``headroom.*`` header fields, ComfyUI's ``comfy_quant`` tensors and
``_quantization_metadata``, a folder's ``*.safetensors.index.json``, and scales whose shape does not fit their weight.

Each damaged file is built here from a good one. What must happen: ``headroom inspect`` and ``headroom convert``
exit 2 with one line naming the file and the field / tensor; the loaders' reader (``parse_int8_layer``) raises
ValueError naming it; a folder's index is checked before any shard is converted; nothing is written.
"""

import json

import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.kernels.int8 import quantize_weight
from comfyui_headroom.quant import convert as convert_mod
from comfyui_headroom.quant.chunked import WeightError, float_rows
from comfyui_headroom.quant.convert import ConvertError, convert_file
from comfyui_headroom.quant.formats import COMFY_LEGACY_KEY, detect_format, encode_comfy_quant, parse_int8_layer
from comfyui_headroom.quant.safetensors_stream import TensorReader
from safetensors.torch import load_file, save_file
from testutil import cli_error

LAYER = "blocks.0.ffn"
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, nested deeper than Python's stack


_one_line_error = cli_error


def _float_model(path, gen):
    save_file({f"{LAYER}.weight": (torch.randn(1024, 1024, generator=gen) * 0.02).to(torch.bfloat16),
               "blocks.0.norm.weight": torch.ones(1024, dtype=torch.bfloat16)}, str(path))
    return path


@pytest.fixture
def converted(tmp_path, gen):
    """A file of ours and one in ComfyUI's layout, converted from the same float model."""
    src = _float_model(tmp_path / "model.safetensors", gen)
    ours, comfy = tmp_path / "ours.safetensors", tmp_path / "comfy.safetensors"
    convert_file(src, ours, progress=False)
    convert_file(src, comfy, layout="comfy", progress=False)
    return ours, comfy


def _rewrite(path, out, metadata=None, tensors=None):
    """``path``'s tensors (some replaced) with its metadata (some replaced) saved as ``out``."""
    with TensorReader(path) as reader:
        old = dict(reader.header.metadata)
    data = load_file(str(path))
    data.update(tensors or {})
    old.update(metadata or {})
    save_file(data, str(out), metadata=old)
    return out


def _refused_everywhere(capsys, path, needle):
    """inspect and convert say it in one line naming the file; the loaders' reader names it too."""
    err = _one_line_error(capsys, "inspect", str(path))
    assert path.name in err and needle in err, err
    out = path.with_name("again.safetensors")
    err = _one_line_error(capsys, "convert", str(path), str(out))
    assert needle in err and not out.exists(), err
    with TensorReader(path) as reader, pytest.raises(ValueError) as caught:
        parse_int8_layer(reader, LAYER + ".", reader.header.metadata)
    assert needle in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# headroom.* header fields
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, needle", [
    ("headroom.block_size", "abc", "'headroom.block_size' is 'abc', not a whole number"),
    ("headroom.block_size", "0", "'headroom.block_size' is '0'"),
    ("headroom.block_size", "-128", "'headroom.block_size' is '-128'"),
    ("headroom.block_size", "9" * 5000, "'headroom.block_size' is '999"),  # int() would refuse 5000 digits itself
    ("headroom.block_size", "99999999", "from 1 to 1048576"),
    ("headroom.block_size", " 128", "'headroom.block_size' is ' 128'"),
    ("headroom.block_size", "١٢٨", "'headroom.block_size'"),  # Arabic-Indic digits: int() takes them
    ("headroom.format_version", "2", "written by a newer headroom"),
    ("headroom.format_version", "one", "'headroom.format_version' is 'one'"),
])
def test_fields_the_reader_uses(tmp_path, capsys, converted, key, value, needle):
    path = _rewrite(converted[0], tmp_path / "damaged.safetensors", {key: value})
    _refused_everywhere(capsys, path, needle)


@pytest.mark.parametrize("key, value, needle", [
    ("headroom.method", "fast", "'headroom.method' is 'fast', not one of rowwise, block, tensorwise"),
    ("headroom.rotation_group", "48", "'headroom.rotation_group' is '48', not one of 16, 32, 64, 128, 256"),
    ("headroom.layout", "../x y", "'headroom.layout' is '../x y', not a layout name"),
    ("headroom.quantized_layers", "blocks.0.ffn", "'headroom.quantized_layers' is 'blocks.0.ffn', not a JSON list"),
    ("headroom.quantized_layers", "[1, 2]", "not a JSON list of names"),
    ("headroom.skipped_layers", '{"a": "b"}', "'headroom.skipped_layers'"),
    ("headroom.skipped_layers", DEEP, "'headroom.skipped_layers' is '[[[["),
    ("headroom.loras", "null", "'headroom.loras'"),
    ("headroom.skip_reasons", '["wte"]', "'headroom.skip_reasons' is '[\"wte\"]', not a JSON object"),
    ("headroom.skip_reasons", '{"wte": 3}', "'headroom.skip_reasons'"),
])
def test_fields_inspect_reads(tmp_path, capsys, converted, key, value, needle):
    path = _rewrite(converted[0], tmp_path / "damaged.safetensors", {key: value})
    err = _one_line_error(capsys, "inspect", str(path))
    assert "damaged.safetensors" in err and needle in err and "convert the original again" in err, err
    assert len(err) < 600  # a huge value is cut, never echoed whole


def test_printed_header_strings_cannot_drive_the_terminal(tmp_path, capsys, converted):
    path = _rewrite(converted[0], tmp_path / "odd.safetensors",
                    {"headroom.source_file": "model\x1b[2J\nformat      float (not quantized)\r" + "x" * 5000})
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\\x1b[2J\\nformat" in out
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("  format")] == [lines[1]] and "headroom INT8" in lines[1]
    assert max(len(line) for line in lines) < 300


# ---------------------------------------------------------------------------------------------------------
# ComfyUI: comfy_quant tensors and _quantization_metadata
# ---------------------------------------------------------------------------------------------------------

def _bytes(blob: bytes):
    return torch.tensor(list(blob), dtype=torch.uint8)


@pytest.mark.parametrize("marker, needle", [
    (_bytes(b"\xff\xfe\x00{"), "is not UTF-8 text"),
    (_bytes(b"int8_tensorwise"), "is not valid JSON"),
    (_bytes(DEEP[:30_000].encode() + DEEP[-30_000:].encode()), "is not valid JSON"),
    (_bytes(b"[1, 2]"), "holds a JSON list, not an object"),
    (_bytes(b'"int8_tensorwise"'), "holds a JSON str, not an object"),
    (torch.tensor([123.0, 125.0]), "is a float32 tensor, not bytes"),
    (_bytes(b" " * 70_000 + b"{}"), "far more than a config"),
    (encode_comfy_quant({"format": "int8_tensorwise", "convrot": "yes"}), "'convrot' 'yes', which is neither"),
    (encode_comfy_quant({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": "256"}),
     "'convrot_groupsize' '256', which is not a whole number"),
    (encode_comfy_quant({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256.5}),
     "'convrot_groupsize' 256.5"),
    (encode_comfy_quant({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": True}),
     "'convrot_groupsize' True"),
    (encode_comfy_quant({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 10 ** 30}),
     "got 1000000000000000000000000000000"),
    (encode_comfy_quant({"format": "int8_tensorwise", "params": [256]}), "'params' [256], which is not an object"),
    (encode_comfy_quant({"format": ["int8_tensorwise"]}), "ComfyUI format ['int8_tensorwise']"),
])
def test_comfy_quant_markers(tmp_path, capsys, converted, marker, needle):
    path = _rewrite(converted[1], tmp_path / "damaged.safetensors", tensors={f"{LAYER}.comfy_quant": marker})
    _refused_everywhere(capsys, path, needle)
    err = _one_line_error(capsys, "inspect", str(path))
    assert f"'{LAYER}." in err  # names the layer's tensor


def _legacy_file(tmp_path, gen, value):
    q, scale = quantize_weight(torch.randn(1024, 1024, generator=gen), "rowwise")
    path = tmp_path / "legacy.safetensors"
    save_file({f"{LAYER}.weight": q, f"{LAYER}.weight_scale": scale}, str(path), metadata={COMFY_LEGACY_KEY: value})
    return path


@pytest.mark.parametrize("value, needle", [
    ("{layers:", "is not valid JSON"),
    (DEEP, "is not valid JSON"),
    ("[1]", "holds a JSON list, not an object"),
    ('{"layers": ["blocks.0.ffn"]}', "'layers' entry that is not an object"),
    ('{"layers": {"blocks.0.ffn": "int8_tensorwise"}}', "gives layer 'blocks.0.ffn' the config 'int8_tensorwise'"),
])
def test_quantization_metadata_header(tmp_path, gen, capsys, value, needle):
    path = _legacy_file(tmp_path, gen, value)
    _refused_everywhere(capsys, path, needle)
    assert COMFY_LEGACY_KEY in _one_line_error(capsys, "inspect", str(path))


# ---------------------------------------------------------------------------------------------------------
# Scales that do not fit their weight: refused, never broadcast
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1024), (2, 512), (1024, 2), (1, 1, 1024), (512,)])
def test_fp8_scale_that_does_not_fit_is_refused_before_writing(tmp_path, capsys, gen, monkeypatch, shape):
    """A square weight's [1, in] scale has one value per output row's worth of numbers: it used to be read as a row
    scale. Now only one value, [out] or [out, 1] pass; checked from the header, before anything is written."""
    weight = (torch.randn(1024, 1024, generator=gen) * 0.02).to(torch.float8_e4m3fn)
    scale = torch.rand(*shape, generator=gen) + 0.5
    src = tmp_path / "fp8.safetensors"
    save_file({f"{LAYER}.weight": weight, f"{LAYER}.weight_scale": scale}, str(src))
    calls = []
    monkeypatch.setattr(convert_mod, "StreamingWriter", lambda *a, **k: calls.append(a))
    err = _one_line_error(capsys, "convert", str(src), str(tmp_path / "out.safetensors"))
    assert f"fp8 scale '{LAYER}.weight_scale' has shape {list(shape)}, which does not fit the weight" in err
    assert not calls and sorted(p.name for p in tmp_path.iterdir()) == ["fp8.safetensors"]
    with pytest.raises(WeightError, match=rf"fp8 scale of shape {list(shape)}".replace("[", r"\[")):
        float_rows(weight, 0, 8, scale, name=f"{LAYER}.weight")  # the ComfyUI loader's path


def test_fp8_scales_that_fit_still_convert(tmp_path, gen):
    weight = (torch.randn(1024, 1024, generator=gen) * 0.02).to(torch.float8_e4m3fn)
    for shape in [(), (1,), (1, 1), (1024,), (1024, 1)]:
        src = tmp_path / "fp8.safetensors"
        save_file({f"{LAYER}.weight": weight, f"{LAYER}.weight_scale": torch.full(shape, 0.5)}, str(src))
        convert_file(src, tmp_path / "out.safetensors", progress=False, overwrite=True)


@pytest.mark.parametrize("scale, needle", [
    (torch.rand(1, 1024), "has shape (1, 1024), which does not fit the weight [1024, 1024]"),
    (torch.rand(1024, 1, 1), "has shape (1024, 1, 1)"),
    (torch.rand(1025), "has shape (1025,)"),
    (torch.ones(1024, dtype=torch.int8), "is int8, not a float tensor"),
    (torch.ones(1024, dtype=torch.uint8), "is uint8, not a float tensor"),
])
def test_int8_scale_that_does_not_fit_is_refused(tmp_path, capsys, gen, scale, needle):
    q, _ = quantize_weight(torch.randn(1024, 1024, generator=gen), "rowwise")
    for fmt, extra in (("plain", {}), ("comfy", {f"{LAYER}.comfy_quant": encode_comfy_quant({"format": "int8_tensorwise"})})):
        path = tmp_path / f"{fmt}.safetensors"
        save_file({f"{LAYER}.weight": q, f"{LAYER}.weight_scale": scale, **extra}, str(path))
        _refused_everywhere(capsys, path, needle)


# ---------------------------------------------------------------------------------------------------------
# A folder's index, checked before any shard is converted
# ---------------------------------------------------------------------------------------------------------

def _sharded(folder, gen):
    folder.mkdir()
    names = {}
    for i in (1, 2):
        shard = f"model-0000{i}-of-00002.safetensors"
        tensors = {f"blocks.{i}.ffn.weight": (torch.randn(1024, 1024, generator=gen) * 0.02).to(torch.bfloat16)}
        save_file(tensors, str(folder / shard))
        names.update({name: shard for name in tensors})
    index = {"metadata": {"total_size": 4 * 2**20}, "weight_map": names}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("damage, needle", [
    (lambda index: "{weight_map:", "is not valid JSON"),
    (lambda index: b"\xff\xfe{}", "is not valid JSON"),
    (lambda index: DEEP, "is not valid JSON"),
    (lambda index: [index], "holds a JSON list, not an object"),
    (lambda index: {"metadata": {}}, "has no weight_map object"),
    (lambda index: dict(index, weight_map=[]), "has no weight_map object"),
    (lambda index: dict(index, metadata=[1]), "'metadata' entry that is not an object"),
    (lambda index: dict(index, weight_map={**index["weight_map"], "blocks.1.ffn.weight": 3}), "to 3, not a file name"),
    (lambda index: dict(index, weight_map={**index["weight_map"], "extra.weight": "model-00003-of-00002.safetensors"}),
     "'model-00003-of-00002.safetensors', which is not a .safetensors file in"),
    (lambda index: dict(index, weight_map={**index["weight_map"], "ghost.weight": "model-00001-of-00002.safetensors"}),
     "maps 'ghost.weight' to 'model-00001-of-00002.safetensors', which does not hold it"),
    (lambda index: dict(index, weight_map={**index["weight_map"], "blocks.1.ffn.weight": "../outside.safetensors"}),
     "'../outside.safetensors', which is not a file next to the index"),
    (lambda index: dict(index, weight_map={**index["weight_map"], "blocks.1.ffn.weight": "/etc/passwd"}),
     "'/etc/passwd', which is not a file next to the index"),
    (lambda index: dict(index, weight_map={**index["weight_map"], "blocks.1.ffn.weight": "sub/x.safetensors"}),
     "'sub/x.safetensors', which is not a file next to the index"),
])
def test_index_checked_before_any_shard_is_converted(tmp_path, gen, capsys, monkeypatch, damage, needle):
    folder = tmp_path / "model"
    index = _sharded(folder, gen)
    _float_model(tmp_path / "outside.safetensors", gen)  # what a ../ shard would reach
    damaged = damage(index)
    path = folder / "model.safetensors.index.json"
    if isinstance(damaged, bytes):
        path.write_bytes(damaged)
    else:
        path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    quantized = []
    monkeypatch.setattr(convert_mod, "quantize_streamed", lambda *a, **k: quantized.append(a))
    err = _one_line_error(capsys, "convert", str(folder), str(tmp_path / "out"))
    assert "model.safetensors.index.json" in err and needle in err, err
    assert not quantized and not (tmp_path / "out").exists()
    assert needle in _one_line_error(capsys, "inspect", str(folder))


def test_a_good_index_still_converts_and_is_rewritten(tmp_path, gen):
    folder = tmp_path / "model"
    _sharded(folder, gen)
    report = convert_mod.convert_folder(folder, tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(report.quantized) == 2 and index["weight_map"]["blocks.2.ffn.weight_scale"].endswith("00002.safetensors")
    assert index["metadata"]["total_size"] == sum(
        p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little") for p in (tmp_path / "out").glob("*.safetensors"))
    with pytest.raises(ConvertError, match="already quantized"):
        detect_format(tmp_path / "out") and convert_mod.convert_folder(tmp_path / "out", tmp_path / "again", progress=False)


def test_names_from_the_file_cannot_break_the_one_line_error(tmp_path, capsys):
    """A tensor name is the file's text: a newline or a terminal escape in it is shown escaped."""
    bad = "blocks.0\n\x1b[2Jffn.weight"
    path = tmp_path / "names.safetensors"
    save_file({bad: torch.tensor([[1.0, float("nan")]] * 4)}, str(path))
    err = _one_line_error(capsys, "convert", str(path), str(tmp_path / "out.safetensors"))
    assert "'blocks.0\\n\\x1b[2Jffn.weight' contains NaN" in err and "\x1b" not in err
