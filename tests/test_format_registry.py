"""The format registry: a toy format added in one file (tests/toy_format.py) is detected, read, written, inspected
and refused as converter input like the built-in ones; the registry lists the built-in formats in order."""

import json

import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.kernels.int8 import quantize_weight, relative_error
from comfyui_headroom.quant.convert import ConvertError, convert_file, convert_path, default_output
from comfyui_headroom.quant.formats import (
    detect_format,
    layer_format,
    layout_names,
    parse_int8_layer,
    register,
    registered_formats,
    unregister,
)
from comfyui_headroom.quant.inspection import inspect_path
from comfyui_headroom.quant.linear import Int8Linear
from comfyui_headroom.quant.safetensors_stream import FormatError, TensorReader
from safetensors.torch import load_file, save_file
from toy_format import TOY_SCALE, ToyFormat, toy_layer

LAYER = "blocks.0.mlp.fc1"
IN, OUT = 1024, 2048


@pytest.fixture
def toy():
    """The toy format, registered for one test only (taken back even when the test fails)."""
    fmt = register(ToyFormat())
    yield fmt
    if fmt in registered_formats():
        unregister(fmt.name)


@pytest.fixture
def weight(gen):
    return torch.randn(OUT, IN, generator=gen) * 0.02


@pytest.fixture
def toy_file(tmp_path, weight, gen):
    """A file in the toy layout, written by hand: one INT8 layer, its bias, a norm and a small float layer."""
    q, scale_t = toy_layer(weight)
    path = tmp_path / "toy.safetensors"
    save_file({f"{LAYER}.weight": q, f"{LAYER}.{TOY_SCALE}": scale_t,
               f"{LAYER}.bias": torch.zeros(OUT), "blocks.0.norm.weight": torch.ones(IN),
               "blocks.0.small.weight": torch.randn(64, IN, generator=gen)}, str(path))
    return path


def _assert_same_function(parsed, weight):
    """The parsed layer is exactly quantize_weight(weight, "block") and computes weight's function."""
    q, scale = quantize_weight(weight, "block")
    layer = Int8Linear.from_quantized(parsed.weight, parsed.scale, block_size=parsed.block_size,
                                      compute_dtype=torch.float32)
    assert layer.method == "block" and layer.block_size == 128
    assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(5))
    assert relative_error(layer(x), x @ weight.T) < 0.03


def test_builtin_formats_in_order():
    assert [f.name for f in registered_formats()] == ["headroom", "comfy", "comfy_legacy", "plain"]
    assert layout_names() == ("headroom", "comfy")
    assert "toy" not in layout_names()  # the toy format exists only inside the `toy` fixture


def test_unregistered_toy_file_is_not_understood(toy_file):
    """Without the toy format its layer falls to the plain fallback, which finds no scale: refused, by name."""
    with TensorReader(toy_file) as reader:
        with pytest.raises(ValueError, match=rf"'{LAYER}\.weight' has no scale"):
            parse_int8_layer(reader, LAYER + ".", reader.header.metadata)
    with pytest.raises(FormatError, match=rf"toy.safetensors: INT8 tensor '{LAYER}\.weight' has no scale .*a layout "
                                          rf"headroom does not know"):
        detect_format(toy_file)  # inspect says so too, rather than "plain_int8, method unknown"


def test_toy_file_detected_read_and_inspected(toy, toy_file, weight, capsys):
    with TensorReader(toy_file) as reader:
        assert layer_format(reader, LAYER + ".", reader.header.metadata) is toy
        parsed = parse_int8_layer(reader, LAYER + ".", reader.header.metadata)
        assert parsed.source_format == "toy" and parsed.rotation_group == 0
        assert parsed.consumed_keys == [f"{LAYER}.weight", f"{LAYER}.{TOY_SCALE}"]
        assert parsed.scale.shape == (OUT, IN // 128)  # our layout, from the transposed one on disk
        _assert_same_function(parsed, weight)
        assert parse_int8_layer(reader, "blocks.0.small.", reader.header.metadata) is None  # float stays float

    info = detect_format(toy_file)  # headers only: the toy format reads its scale's shape on a meta tensor
    assert (info.format, info.method, info.block_size) == ("toy", "block", 128)
    assert info.quantized_layers == [LAYER] and info.skipped_layers == ["blocks.0.small"]
    report = inspect_path(toy_file)
    assert report.vram.int8_scale_bytes == 4 * OUT * (IN // 128)  # the toy scale counted, not one per row
    assert cli.main(["inspect", str(toy_file)]) == 0
    assert "toy INT8, method block, block size 128" in capsys.readouterr().out


def test_toy_file_is_refused_as_converter_input(toy, toy_file, tmp_path):
    with pytest.raises(ConvertError, match=r"already quantized \(toy INT8, block, 1 layers\)"):
        convert_path(toy_file, tmp_path / "again.safetensors", progress=False)


def test_converter_writes_the_toy_layout(toy, tmp_path, weight, capsys):
    src = tmp_path / "model.safetensors"
    save_file({f"{LAYER}.weight": weight.to(torch.bfloat16), f"{LAYER}.bias": torch.zeros(OUT),
               "blocks.0.norm.weight": torch.ones(IN)}, str(src))
    assert default_output(src, "block", "toy").name == "model-int8-toy.safetensors"
    assert cli.main(["convert", str(src), "--layout", "toy", "--method", "block", "--quiet"]) == 0
    capsys.readouterr()
    dst = tmp_path / "model-int8-toy.safetensors"
    stored = load_file(str(dst))
    assert set(stored) == {"blocks.0.norm.weight", f"{LAYER}.bias", f"{LAYER}.{TOY_SCALE}", f"{LAYER}.weight"}
    assert stored[f"{LAYER}.{TOY_SCALE}"].shape == (IN // 128, OUT)  # as the toy format stores it
    with TensorReader(dst) as reader:
        assert json.loads(reader.header.metadata["headroom.quantized_layers"]) == [LAYER]
        assert reader.header.metadata["headroom.layout"] == "toy"
        parsed = parse_int8_layer(reader, LAYER + ".", reader.header.metadata)
        assert parsed.source_format == "toy"  # its per-layer scale key beats our header-wide metadata
        _assert_same_function(parsed, weight.to(torch.bfloat16).float())
    assert detect_format(dst).format == "toy"

    # the format's constraints reach the user as one line: block scales only, no rotation
    for extra, message in ((["--method", "rowwise"], "cannot store rowwise scales"),
                           (["--method", "block", "--rotate", "256"], "cannot store Hadamard-rotated")):
        out = tmp_path / "refused.safetensors"
        assert cli.main(["convert", str(src), str(out), "--layout", "toy", "--quiet"] + extra) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_registration_is_checked_and_undone(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(ToyFormat())
    assert layout_names() == ("headroom", "comfy", "toy")
    unregister("toy")
    assert "toy" not in layout_names()
    with pytest.raises(ConvertError, match="unknown layout 'toy'; choose one of headroom, comfy"):
        convert_file(__file__, "unused.safetensors", layout="toy")
