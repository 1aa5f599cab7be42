"""Interop with ComfyUI's own "convrot" INT8 files, checked against comfy-kitchen itself.

comfy-kitchen (ComfyUI's quantization library) lives in the ComfyUI environment, so it runs in a subprocess
(HEADROOM_COMFY_PYTHON, else /work/cvenv/bin/python): it writes rotated layers the way ComfyUI saves them and
reads back the files `headroom convert --layout comfy --rotate G` writes; with COMFYUI_DIR, ComfyUI's own
Linear loads those files too. Skipped with the reason when that interpreter or comfy-kitchen is missing.
"""

import json
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from testutil import outlier_weight

from comfyui_headroom.quant import Int8Linear, relative_error
from comfyui_headroom.quant.convert import convert_file
from comfyui_headroom.quant.rotation import comfy_rotated_layer, rotation_group_of

COMFY_SIDE = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from comfy_kitchen.tensor import QuantizedTensor
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout

    work = sys.argv[1]
    src = load_file(work + "/float.safetensors")
    x = src["x"]
    out = {}
    # 1. comfy-kitchen writes rotated layers the way ComfyUI's state_dict does (weight, weight_scale, comfy_quant)
    for group in (16, 64, 256):
        w = src["w"]
        qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, convrot=True,
                                        convrot_groupsize=group)
        prefix = f"blocks.{group}.mlp."
        out.update(qt.state_dict(prefix + "weight"))
        conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
        out[prefix + "comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        out["expect." + prefix + "linear"] = torch.nn.functional.linear(x, qt).float()
        out["expect." + prefix + "dequant"] = qt.dequantize().float()
    save_file(out, work + "/ck.safetensors")
    # 2. comfy-kitchen reads the layers our converter wrote (headroom convert --layout comfy --rotate G)
    ours = {}
    for group in (16, 64, 256):
        ours.update(load_file(work + f"/ours_{group}.safetensors"))
    back = {}
    for key in ours:
        if key.endswith(".comfy_quant"):
            prefix = key[: -len("comfy_quant")]
            conf = json.loads(bytes(ours[key].tolist()).decode())
            params = TensorWiseINT8Layout.Params(scale=ours[prefix + "weight_scale"], orig_dtype=torch.float32,
                                                 orig_shape=tuple(ours[prefix + "weight"].shape),
                                                 convrot=conf["convrot"], convrot_groupsize=conf["convrot_groupsize"])
            qt = QuantizedTensor(ours[prefix + "weight"], "TensorWiseINT8Layout", params)
            back[prefix + "dequant"] = qt.dequantize().float()
            back[prefix + "linear"] = torch.nn.functional.linear(x, qt).float()
    save_file(back, work + "/ours_read_by_ck.safetensors")
    print("OK")
""")


def _comfy_python():
    for path in (os.environ.get("HEADROOM_COMFY_PYTHON"), "/work/cvenv/bin/python"):
        if path and os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="module")
def comfy_roundtrip(tmp_path_factory):
    python = _comfy_python()
    if python is None:
        pytest.skip("no ComfyUI Python (set HEADROOM_COMFY_PYTHON) to run comfy-kitchen")
    work = tmp_path_factory.mktemp("convrot")
    gen = torch.Generator().manual_seed(99)
    w = outlier_weight(1024, 1024, gen) * 0.02
    x = torch.randn(7, 1024, generator=gen)
    save_file({"w": w.contiguous(), "x": x}, str(work / "float.safetensors"))
    for group in (16, 64, 256):
        save_file({f"blocks.{group}.attn.weight": w.contiguous()}, str(work / f"src_{group}.safetensors"))
        convert_file(work / f"src_{group}.safetensors", work / f"ours_{group}.safetensors", layout="comfy",
                     rotate=group, progress=False)
    proc = subprocess.run([python, "-c", COMFY_SIDE, str(work)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named 'comfy_kitchen'" in proc.stderr:
        pytest.skip(f"comfy-kitchen is not installed in {python}")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    return work, w, x


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _our_layer_from_file(tensors, prefix):
    """What our loader does with a ComfyUI convrot layer: the group comes from the layer's comfy_quant JSON."""
    conf = json.loads(bytes(tensors[prefix + "comfy_quant"].tolist()).decode())
    return Int8Linear.from_quantized(tensors[prefix + "weight"], tensors[prefix + "weight_scale"],
                                     compute_dtype=torch.float32, rotation_group=rotation_group_of(conf))


@pytest.mark.parametrize("group", [16, 64, 256])
def test_we_read_comfy_kitchens_rotated_files(comfy_roundtrip, group):
    work, w, x = comfy_roundtrip
    tensors = _read(work / "ck.safetensors")
    prefix = f"blocks.{group}.mlp."
    layer = _our_layer_from_file(tensors, prefix)
    assert layer.rotation_group == group
    # same dequantized weight as comfy-kitchen's own un-rotation, and the original weight within INT8 error
    assert relative_error(layer.dequantized_weight(), tensors["expect." + prefix + "dequant"]) < 1e-6
    assert relative_error(layer.dequantized_weight(), w) < 0.02
    # comfy-kitchen's int8 linear also quantizes the activation; our CPU path does not: agree within INT8 error
    with torch.no_grad():
        y = layer(x)
    assert relative_error(y, tensors["expect." + prefix + "linear"]) < 0.02
    assert relative_error(y, x @ w.T) < 0.02
    # reading the weight as if it were plain (ignoring convrot) would be garbage: the test can tell
    plain = Int8Linear.from_quantized(tensors[prefix + "weight"], tensors[prefix + "weight_scale"],
                                      compute_dtype=torch.float32)
    with torch.no_grad():
        assert relative_error(plain(x), x @ w.T) > 0.5


@pytest.mark.parametrize("group", [16, 64, 256])
def test_comfy_kitchen_reads_our_rotated_layers(comfy_roundtrip, group):
    work, w, x = comfy_roundtrip
    back = _read(work / "ours_read_by_ck.safetensors")
    ck = _read(work / "ck.safetensors")
    ours = _read(work / f"ours_{group}.safetensors")
    prefix = f"blocks.{group}.attn."
    assert relative_error(back[prefix + "dequant"], w) < 0.02
    assert relative_error(back[prefix + "linear"], x @ w.T) < 0.02
    # our quantization of the rotated weight is comfy-kitchen's, up to float summation order
    diff = (ours[prefix + "weight"].int() - ck[f"blocks.{group}.mlp.weight"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.allclose(ours[prefix + "weight_scale"], ck[f"blocks.{group}.mlp.weight_scale"], rtol=1e-5)


def test_comfy_rotated_layer_helper_matches_the_converter(comfy_roundtrip):
    work, w, _ = comfy_roundtrip
    ours = _read(work / "ours_64.safetensors")
    mine = comfy_rotated_layer("blocks.64.attn.", w, 64)
    for key, tensor in mine.items():
        assert torch.equal(tensor, ours[key]), key


def test_stock_comfyui_layers_load_our_rotated_files(comfy_roundtrip, tmp_path):
    """ComfyUI's own ``mixed_precision_ops`` Linear (comfy_quant JSON -> convrot params) reads our files."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        pytest.skip("COMFYUI_DIR is not set to an extracted ComfyUI v0.29")
    work, w, _ = comfy_roundtrip
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_int8_interop.py")
    ours = [str(work / f"ours_{g}.safetensors") for g in (16, 256)]
    cmd = [_comfy_python(), script, comfy_dir, str(tmp_path)] + [a for f in ours for a in ("--ours", f)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for group in (16, 256):
        read = _read(tmp_path / f"comfy_read_ours_{group}.safetensors")
        prefix = f"blocks.{group}.attn."
        assert relative_error(read[prefix + "dequantized"], w) < 0.02
        x = read[prefix + "input"].float()
        assert relative_error(read[prefix + "forward"], x @ w.T) < 0.03
