"""Save INT8 Model: a model with LoRAs applied -> an INT8 file through the converter's writer.

Two levels: (1) the core (``model_tensor_source`` + ``convert_source``) in this venv, with a patch function
doing plain LoRA math; (2) the node itself inside ComfyUI's real modules (``ModelPatcher``, ``comfy.lora``,
``folder_paths``) under ComfyUI's Python - skipped with the reason when COMFYUI_DIR / HEADROOM_COMFY_PYTHON
are not set.
"""

import json
import os
import subprocess
import textwrap

import pytest
import torch
from comfyui_headroom.kernels.int8 import quantize_weight
from comfyui_headroom.quant import Int8Linear, relative_error
from comfyui_headroom.quant.convert import convert_source
from comfyui_headroom.quant.formats import decode_comfy_quant, parse_int8_layer
from comfyui_headroom.quant.lora_bake import model_tensor_source
from comfyui_headroom.quant.rotation import rotation_group_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DIM = 1024


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.norm = nn.LayerNorm(DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)


class TinyDiT(nn.Module):
    """Real module names of a diffusion transformer; ``blocks.0.fc2`` is an INT8 layer (as our loader makes)."""

    def __init__(self, gen, int8_rotation=256):
        super().__init__()
        self.blocks = nn.ModuleList([Block()])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(DIM, 64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self.blocks[0].fc2 = Int8Linear.from_linear(self.blocks[0].fc2, compute_dtype=torch.float32,
                                                    rotation_group=int8_rotation)


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _plain_weight(tensors, metadata, name):
    parsed = parse_int8_layer(tensors, name + ".", metadata)
    group = rotation_group_of(decode_comfy_quant(tensors[name + ".comfy_quant"])) if parsed.convrot else 0
    assert parsed.rotation_group == group  # the format read the group once
    return Int8Linear.from_quantized(parsed.weight, parsed.scale, block_size=parsed.block_size,
                                     rotation_group=group).dequantized_weight()


@pytest.mark.parametrize("rotate", [0, 256])
def test_model_source_writes_patched_weights_through_the_converter(tmp_path, gen, rotate):
    model = TinyDiT(gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = {"blocks.0.qkv.weight": torch.randn(3 * DIM, 8, generator=gen) @ torch.randn(8, DIM, generator=gen) * 0.002,
              "blocks.0.fc2.weight": torch.randn(DIM, 8, generator=gen) @ torch.randn(8, 2 * DIM, generator=gen) * 0.002,
              "final_layer.linear.weight": torch.full((64, DIM), 0.01)}
    calls = []

    def patch(key, weight):
        calls.append(key)
        assert weight.dtype == torch.float32
        return weight + deltas[key] if key in deltas else weight

    source = model_tensor_source(model, patch, name="TinyDiT")
    assert "blocks.0.fc2.weight_scale" not in source.infos  # INT8 layers are re-quantized with the LoRA inside
    dst = tmp_path / "saved.safetensors"
    report = convert_source(source, dst, rotate=rotate)
    tensors, metadata = _read(dst)
    assert sorted(report.quantized) == ["blocks.0.fc2", "blocks.0.qkv"] and "final_layer.linear" in report.kept
    assert len(report.rotated) == (2 if rotate else 0)
    qkv = before["blocks.0.qkv.weight"] + deltas["blocks.0.qkv.weight"]
    if not rotate:
        assert torch.equal(tensors["blocks.0.qkv.weight"], quantize_weight(qkv, "rowwise")[0])
    assert relative_error(_plain_weight(tensors, metadata, "blocks.0.qkv"), qkv) < 0.02
    fc2 = model.blocks[0].fc2.dequantized_weight() + deltas["blocks.0.fc2.weight"]
    assert relative_error(_plain_weight(tensors, metadata, "blocks.0.fc2"), fc2) < 0.02
    assert torch.allclose(tensors["final_layer.linear.weight"],
                          before["final_layer.linear.weight"] + deltas["final_layer.linear.weight"])
    assert torch.equal(tensors["blocks.0.norm.weight"], before["blocks.0.norm.weight"])
    assert "blocks.0.fc2.rotation_group" not in tensors
    # the model itself is untouched, and every weight was computed exactly once
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert len(calls) == len(set(calls)) and set(calls) == set(source.infos)  # one at a time, each once


COMFY_SIDE = textwrap.dedent("""
    import json, sys
    comfy_dir, work = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    import torch
    from safetensors.torch import load_file, save_file
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.lora, comfy.model_patcher, folder_paths
    from comfyui_headroom.nodes.save_nodes import HeadroomSaveInt8Model, NODE_CLASS_MAPPINGS
    from comfyui_headroom.quant import Int8Linear

    torch.manual_seed(0)
    class Base(torch.nn.Module):   # what ModelPatcher.model is: it holds .diffusion_model
        def __init__(self):
            super().__init__()
            dm = torch.nn.Module()
            dm.blocks = torch.nn.ModuleList([torch.nn.Module()])
            dm.blocks[0].qkv = torch.nn.Linear(1024, 3072).to(torch.bfloat16)
            dm.blocks[0].fc2 = Int8Linear.from_linear(torch.nn.Linear(2048, 1024), rotation_group=64)
            dm.final_layer = torch.nn.Linear(1024, 64).to(torch.bfloat16)
            self.diffusion_model = dm
    base = Base()
    save_file({k: v.contiguous() for k, v in base.diffusion_model.state_dict().items()}, work + "/before.safetensors")
    patcher = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    key_map = {}
    for k in patcher.model_state_dict():
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    lora = load_file(work + "/lora.safetensors")
    loaded = comfy.lora.load_lora(lora, key_map)
    patched = patcher.clone()
    patched.add_patches(loaded, 0.8)
    folder_paths.set_output_directory(work + "/output")
    node = NODE_CLASS_MAPPINGS["HeadroomSaveInt8Model"]()
    result = node.save(patched, "headroom/test", "rowwise", "output", rotate="256")
    status = result["result"][0]
    after = base.diffusion_model.state_dict()
    before = load_file(work + "/before.safetensors")
    unchanged = all(torch.equal(after[k], before[k]) for k in before)
    print(json.dumps({"status": status, "unchanged": unchanged, "patched_keys": len(patched.patches)}))
""")


def _comfy_env():
    comfy = os.environ.get("COMFYUI_DIR")
    python = os.environ.get("HEADROOM_COMFY_PYTHON")
    if not comfy or not os.path.isfile(os.path.join(comfy, "main.py")):
        pytest.skip("COMFYUI_DIR is not set to an extracted ComfyUI v0.29")
    if not python or not os.path.exists(python):
        pytest.skip("HEADROOM_COMFY_PYTHON is not set (a python with ComfyUI's requirements + this package)")
    return comfy, python


def test_save_node_in_real_comfyui_merges_comfys_lora_patches(tmp_path, gen):
    comfy, python = _comfy_env()
    rank, alpha, strength = 8, 4.0, 0.8
    shapes = {"blocks.0.qkv": (3 * DIM, DIM), "blocks.0.fc2": (DIM, 2 * DIM), "final_layer": (64, DIM)}
    lora, factors = {}, {}
    for name, (out_f, in_f) in shapes.items():
        down, up = torch.randn(rank, in_f, generator=gen) * 0.05, torch.randn(out_f, rank, generator=gen) * 0.05
        base = "lora_unet_" + name.replace(".", "_")
        lora.update({base + ".lora_down.weight": down, base + ".lora_up.weight": up, base + ".alpha": torch.tensor(alpha)})
        factors[name] = strength * alpha / rank * up @ down
    save_file(lora, str(tmp_path / "lora.safetensors"))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([python, "-c", COMFY_SIDE, comfy, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["unchanged"], "saving must not modify the model"
    assert "2 layers INT8 rowwise, rotated 256" in result["status"] and "3 patched weights merged" in result["status"]
    files = list((tmp_path / "output" / "headroom").glob("test_*_.safetensors"))
    assert len(files) == 1, os.listdir(tmp_path / "output")
    tensors, metadata = _read(files[0])
    before = load_file(str(tmp_path / "before.safetensors"))
    from comfyui_headroom.kernels.rotation import unrotate_weight
    from comfyui_headroom.quant import dequantize_weight

    fc2_float = unrotate_weight(dequantize_weight(before["blocks.0.fc2.weight"], before["blocks.0.fc2.weight_scale"]), 64)
    expected = {"blocks.0.qkv": before["blocks.0.qkv.weight"].float() + factors["blocks.0.qkv"],
                "blocks.0.fc2": fc2_float + factors["blocks.0.fc2"]}
    for name, merged in expected.items():
        got = _plain_weight(tensors, metadata, name)
        assert relative_error(got, merged) < 0.02, name
        assert relative_error(merged, merged - factors[name]) > 0.05  # the LoRA is visible at this size
    final = before["final_layer.weight"].float() + factors["final_layer"]
    assert relative_error(tensors["final_layer.weight"].float(), final) < 5e-3  # kept float, LoRA merged
