"""INT8 file formats: every layout we read round-trips into Int8Linear; detect_format reads headers only."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from comfyui_headroom.kernels.int8 import dequantize_weight, quantize_weight, relative_error
from comfyui_headroom.quant.convert import convert_file
from comfyui_headroom.quant.formats import (
    COMFY_LEGACY_KEY,
    decode_comfy_quant,
    detect_format,
    encode_comfy_quant,
    parse_int8_layer,
)
from comfyui_headroom.quant.linear import Int8Linear
from comfyui_headroom.quant.safetensors_stream import FormatError, TensorReader
from safetensors.torch import load_file, save_file
from testutil import comfyui_dir

PREFIX = "blocks.0.attn.qkv."


def _float_checkpoint(path, gen, out_features=1536, in_features=1024):
    """A small DiT-like float checkpoint: one big Linear, its bias, a norm and a small projection."""
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    tensors = {
        PREFIX + "weight": weight.to(torch.bfloat16),
        PREFIX + "bias": torch.randn(out_features, generator=gen).to(torch.bfloat16),
        "blocks.0.norm1.weight": torch.ones(in_features),
        "blocks.0.proj_small.weight": torch.randn(64, in_features, generator=gen),
    }
    save_file(tensors, str(path))
    return tensors


def _assert_loads_as(layer_tensors, weight_float, method, block_size=128):
    """parse result -> Int8Linear.from_quantized equals quantize_weight of the original float weight."""
    expected_q, expected_scale = quantize_weight(weight_float, method, block_size)
    layer = Int8Linear.from_quantized(layer_tensors.weight, layer_tensors.scale, block_size=layer_tensors.block_size)
    assert layer.method == method
    assert torch.equal(layer.weight, expected_q)
    assert torch.equal(layer.weight_scale, expected_scale)
    assert torch.equal(layer.dequantized_weight(), dequantize_weight(expected_q, expected_scale, block_size=block_size))
    x = torch.randn(2, weight_float.shape[1], generator=torch.Generator().manual_seed(3))
    y = layer.float()(x)
    assert relative_error(y, x @ weight_float.float().T) < 0.03


@pytest.mark.parametrize("method,block_size", [("rowwise", 128), ("block", 128), ("block", 64), ("tensorwise", 128)])
def test_headroom_layout_round_trip(tmp_path, gen, method, block_size):
    src = tmp_path / "model.safetensors"
    tensors = _float_checkpoint(src, gen)
    dst = tmp_path / "model-int8.safetensors"
    convert_file(src, dst, method=method, block_size=block_size, progress=False)
    with TensorReader(dst) as reader:
        parsed = parse_int8_layer(reader, PREFIX, reader.header.metadata)
        assert parsed.source_format == "headroom" and not parsed.convrot
        assert parsed.block_size == block_size
        assert sorted(parsed.consumed_keys) == [PREFIX + "weight", PREFIX + "weight_scale"]
        _assert_loads_as(parsed, tensors[PREFIX + "weight"].float(), method, block_size)
        assert parse_int8_layer(reader, "blocks.0.proj_small.", reader.header.metadata) is None  # stayed float
        assert parse_int8_layer(reader, "no.such.layer.", reader.header.metadata) is None
    info = detect_format(dst)
    assert (info.format, info.method, info.quantized_layers) == ("headroom", method, [PREFIX[:-1]])
    assert info.block_size == (block_size if method == "block" else None)
    assert info.skipped_layers == ["blocks.0.proj_small"]
    meta = info.metadata
    assert json.loads(meta["headroom.quantized_layers"]) == [PREFIX[:-1]]
    assert meta["headroom.method"] == method and meta["headroom.block_size"] == str(block_size)
    assert len(meta["headroom.source_sha256_of_header_and_size"]) == 64


@pytest.mark.parametrize("method", ["rowwise", "tensorwise"])
def test_comfy_layout_round_trip(tmp_path, gen, method):
    src = tmp_path / "model.safetensors"
    tensors = _float_checkpoint(src, gen)
    dst = tmp_path / "model-comfy.safetensors"
    convert_file(src, dst, method=method, layout="comfy", progress=False)
    state = load_file(str(dst))
    assert decode_comfy_quant(state[PREFIX + "comfy_quant"]) == {"format": "int8_tensorwise"}
    # ComfyUI multiplies the int8 weight by the scale as stored: a row scale must be [out, 1].
    assert state[PREFIX + "weight_scale"].shape == ((1536, 1) if method == "rowwise" else ())
    parsed = parse_int8_layer(state, PREFIX)
    assert parsed.source_format == "comfy"
    assert PREFIX + "comfy_quant" in parsed.consumed_keys
    _assert_loads_as(parsed, tensors[PREFIX + "weight"].float(), method)
    assert detect_format(dst).format == "comfy"


def test_comfy_legacy_header_round_trip(tmp_path, gen):
    weight = torch.randn(1024, 2048, generator=gen)
    q, scale = quantize_weight(weight, "tensorwise")
    path = tmp_path / "legacy.safetensors"
    layers = {PREFIX[:-1]: {"format": "int8_tensorwise"}}
    save_file({PREFIX + "weight": q, PREFIX + "weight_scale": scale, PREFIX + "input_scale": torch.tensor(1.0)},
              str(path), metadata={COMFY_LEGACY_KEY: json.dumps({"format_version": "1.0", "layers": layers})})
    with TensorReader(path) as reader:
        parsed = parse_int8_layer(reader, PREFIX, reader.header.metadata)
        assert parsed.source_format == "comfy_legacy"
        assert PREFIX + "input_scale" in parsed.consumed_keys
        _assert_loads_as(parsed, weight, "tensorwise")
        # Without the header metadata the same tensors read as a plain int8 file.
        assert parse_int8_layer(reader, PREFIX).source_format == "plain"
    assert detect_format(path).format == "comfy_legacy"


def test_plain_lightx2v_row_scale_round_trip(tmp_path, gen):
    """lightx2v int8-vllm: int8 weight + float32 weight_scale [out, 1], no description."""
    weight = torch.randn(2048, 1024, generator=gen)
    q, scale = quantize_weight(weight, "rowwise")
    path = tmp_path / "lightx2v.safetensors"
    save_file({PREFIX + "weight": q, PREFIX + "weight_scale": scale[:, None].contiguous()}, str(path))
    parsed = parse_int8_layer(load_file(str(path)), PREFIX)
    assert parsed.source_format == "plain" and parsed.scale.shape == (2048,)
    _assert_loads_as(parsed, weight, "rowwise")
    info = detect_format(path)
    assert (info.format, info.method) == ("plain_int8", "rowwise")


def test_plain_onetrainer_scalar_scale_weight_round_trip(tmp_path, gen):
    """OneTrainer / convert_to_quant: int8 weight + scalar ``scale_weight``."""
    weight = torch.randn(1024, 1024, generator=gen)
    q, scale = quantize_weight(weight, "tensorwise")
    path = tmp_path / "onetrainer.safetensors"
    save_file({PREFIX + "weight": q, PREFIX + "scale_weight": scale.reshape(1).to(torch.bfloat16).float()}, str(path))
    parsed = parse_int8_layer(load_file(str(path)), PREFIX)
    assert parsed.consumed_keys == [PREFIX + "weight", PREFIX + "scale_weight"]
    assert parsed.scale.shape == ()
    layer = Int8Linear.from_quantized(parsed.weight, parsed.scale)
    assert torch.equal(layer.weight, q)
    assert relative_error(layer.dequantized_weight(), weight) < 0.02
    assert detect_format(path).method == "tensorwise"


def test_convrot_flag_and_unknown_comfy_format(gen):
    q, scale = quantize_weight(torch.randn(256, 512, generator=gen), "rowwise")
    state = {PREFIX + "weight": q, PREFIX + "weight_scale": scale[:, None],
             PREFIX + "comfy_quant": encode_comfy_quant({"format": "int8_tensorwise", "convrot": True,
                                                         "convrot_groupsize": 256})}
    assert parse_int8_layer(state, PREFIX).convrot is True
    state[PREFIX + "comfy_quant"] = encode_comfy_quant({"format": "convrot_w4a4"})
    with pytest.raises(ValueError, match="convrot_w4a4"):
        parse_int8_layer(state, PREFIX)


def test_rotation_group_is_read_by_the_format(gen):
    """The format that reads a rotated layer says its group (nested under params too, or from an old header), and
    refuses a group it cannot undo, naming the tensor; dequantized() un-rotates."""
    from comfyui_headroom.kernels.rotation import quantize_rotated

    weight = torch.randn(256, 512, generator=gen)
    q, scale = quantize_rotated(weight, 64, "rowwise")
    nested = {"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": 64}}
    state = {PREFIX + "weight": q, PREFIX + "weight_scale": scale[:, None],
             PREFIX + "comfy_quant": encode_comfy_quant(nested)}
    parsed = parse_int8_layer(state, PREFIX)
    assert (parsed.source_format, parsed.rotation_group, parsed.convrot) == ("comfy", 64, True)
    assert relative_error(parsed.dequantized(), weight) < 0.02
    assert relative_error(dequantize_weight(parsed.weight, parsed.scale), weight) > 0.5  # still rotated on disk
    legacy = {COMFY_LEGACY_KEY: json.dumps({"layers": {PREFIX[:-1]: {"format": "int8_tensorwise", "convrot": True}}})}
    plain_state = {k: v for k, v in state.items() if not k.endswith("comfy_quant")}
    assert parse_int8_layer(plain_state, PREFIX, legacy).rotation_group == 256  # ComfyUI's default group
    assert parse_int8_layer(plain_state, PREFIX).rotation_group == 0
    state[PREFIX + "comfy_quant"] = encode_comfy_quant({"format": "int8_tensorwise", "convrot": True,
                                                        "convrot_groupsize": 48})
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight' is Hadamard-rotated \(convrot\).*un-rotate"):
        parse_int8_layer(state, PREFIX)


def test_float_and_fp8_layers_are_not_int8(gen):
    state = {PREFIX + "weight": torch.randn(8, 8, generator=gen).to(torch.float8_e4m3fn),
             PREFIX + "weight_scale": torch.tensor(0.5),
             PREFIX + "comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn"}),
             "plain.weight": torch.randn(8, 8, generator=gen)}
    assert parse_int8_layer(state, PREFIX) is None
    assert parse_int8_layer(state, "plain.") is None


def test_int8_weight_without_scale_names_the_tensor():
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight' has no scale"):
        parse_int8_layer({PREFIX + "weight": torch.zeros(4, 4, dtype=torch.int8)}, PREFIX)


def test_scale_that_does_not_fit_the_weight_is_refused():
    state = {PREFIX + "weight": torch.zeros(4, 8, dtype=torch.int8), PREFIX + "weight_scale": torch.ones(3)}
    with pytest.raises(ValueError, match="does not fit"):
        parse_int8_layer(state, PREFIX)


def test_detect_format_float_and_errors(tmp_path, gen):
    src = tmp_path / "model.safetensors"
    _float_checkpoint(src, gen)
    info = detect_format(src)
    assert (info.format, info.method, info.quantized_layers) == ("float", None, [])
    assert info.dtypes["bfloat16"]["tensors"] == 2 and info.total_bytes == src.stat().st_size
    with pytest.raises(FormatError, match="does not exist"):
        detect_format(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not a safetensors file")
    with pytest.raises(FormatError, match="truncated or corrupt header"):
        detect_format(tmp_path / "junk.safetensors")


def _comfy_python():
    python = os.environ.get("HEADROOM_COMFY_PYTHON")
    return python if python and os.path.exists(python) else None


@pytest.mark.comfyui
@pytest.mark.skipif(comfyui_dir() is None or _comfy_python() is None,
                    reason="needs COMFYUI_DIR and HEADROOM_COMFY_PYTHON (a ComfyUI + comfy_kitchen environment)")
def test_comfyui_reads_ours_and_we_read_comfy_kitchen(tmp_path, gen):
    """Through ComfyUI's real code: its Linear loads our --layout comfy files, and we load what it writes."""
    src = tmp_path / "model.safetensors"
    tensors = _float_checkpoint(src, gen)
    ours = {}
    for method in ("rowwise", "tensorwise"):
        ours[method] = tmp_path / f"ours-{method}.safetensors"
        convert_file(src, ours[method], method=method, layout="comfy", progress=False)
    script = Path(__file__).with_name("comfy_int8_interop.py")
    cmd = [_comfy_python(), str(script), comfyui_dir(), str(tmp_path)]
    for path in ours.values():
        cmd += ["--ours", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    for method, path in ours.items():  # ComfyUI read ours: same weights, same function
        seen = load_file(str(tmp_path / f"comfy_read_{path.name}"))
        parsed = parse_int8_layer(load_file(str(path)), PREFIX)
        layer = Int8Linear.from_quantized(parsed.weight, parsed.scale, tensors[PREFIX + "bias"], compute_dtype=torch.float32)
        assert torch.allclose(seen[PREFIX + "dequantized"], layer.dequantized_weight().to(torch.bfloat16).float())
        x = seen[PREFIX + "input"].float()
        reference = x @ tensors[PREFIX + "weight"].float().T + tensors[PREFIX + "bias"].float()
        assert relative_error(seen[PREFIX + "forward"], reference) < 0.03, method

    for method in ("rowwise", "tensorwise"):  # we read comfy_kitchen's own serialization
        state = load_file(str(tmp_path / f"kitchen_{method}.safetensors"))
        parsed = parse_int8_layer(state, "blocks.0.proj.")
        assert parsed is not None and parsed.source_format == "comfy" and parsed.method == method
        layer = Int8Linear.from_quantized(parsed.weight, parsed.scale)
        assert torch.allclose(layer.dequantized_weight(), state["reference.comfy_dequantized"], rtol=0, atol=1e-6)
        assert relative_error(layer.dequantized_weight(), state["reference.float_weight"]) < 0.02
