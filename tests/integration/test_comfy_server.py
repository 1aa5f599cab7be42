"""Our nodes inside a running ComfyUI: /object_info, and API prompts that sample a tiny Flux with KSampler.

Each comparison queues the same graph twice - once through ComfyUI's stock nodes (UNETLoader, CLIPLoader,
LoraLoaderModelOnly) and once through ours - and compares the latents SaveLatent wrote.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_models import clip_l_state_dict, flux_lora_state_dict, flux_state_dict

from comfyui_headroom.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

pytestmark = pytest.mark.comfyui

OURS = [name for name in NODE_CLASS_MAPPINGS if name.startswith("Headroom") and
        NODE_CLASS_MAPPINGS[name].__module__.rsplit(".", 1)[-1] in ("native_nodes", "memory_nodes", "doctor_node")]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def files(comfyui_server):
    flux = flux_state_dict()
    save_file(flux, str(comfyui_server.models("diffusion_models") / "flux_tiny.safetensors"))
    save_file(clip_l_state_dict(), str(comfyui_server.models("text_encoders") / "clip_l_tiny.safetensors"))
    save_file(flux_lora_state_dict(flux, std=0.1), str(comfyui_server.models("loras") / "flux_tiny_lora.safetensors"))
    return comfyui_server


def graph(model_node: dict, prefix: str, seed: int = 7, clip_node: dict | None = None, lora: dict | None = None):
    """CLIP -> prompts; model -> (LoRA) -> KSampler (3 steps, 64x64) -> SaveLatent; plus a Memory Report."""
    g = {
        "1": clip_node or {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_tiny.safetensors",
                                                                 "type": "stable_diffusion"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 0]}},
        "4": model_node,
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": 3, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                                                 "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
    if lora is not None:
        g["9"] = lora
        g["6"]["inputs"]["model"] = ["9", 0]
    return g


def int8_loader(**overrides):
    inputs = {"unet_name": "flux_tiny.safetensors", "weight_format": "auto", "quantize_on_load": True,
              "compute": "auto", "skip_patterns": "", "gpu_budget_gb": 0.0, "blocks_resident": 0}
    inputs.update(overrides)
    return {"class_type": "HeadroomLoadDiffusionModelInt8", "inputs": inputs}


STOCK_UNET = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux_tiny.safetensors", "weight_dtype": "default"}}


def latent(server, prefix):
    return load_file(str(server.latent_file(prefix)))["latent_tensor"]


def test_object_info_lists_every_node_with_its_inputs(comfyui_server):
    info = comfyui_server.object_info()
    assert set(OURS) == set(EXPECTED_INPUTS)
    for name in OURS:
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        declared = NODE_CLASS_MAPPINGS[name].INPUT_TYPES
        assert node["category"] == "headroom"
        assert node["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert node["output"][-1] == "STRING"
        for section in ("required", "optional"):
            assert set(node["input"].get(section, {})) == set(EXPECTED_INPUTS[name].get(section, ())), (name, section)
        for section in node["input"].values():
            for key, spec in section.items():
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), f"{name}.{key} has no tooltip"


EXPECTED_INPUTS = {
    "HeadroomLoadDiffusionModelInt8": {"required": ("unet_name", "weight_format", "quantize_on_load", "compute",
                                                    "skip_patterns", "gpu_budget_gb", "blocks_resident"),
                                       "optional": ("min_features", "rotate", "quantize_modulation", "devices",
                                                    "gpu_budgets_gb", "ram_budget_gb", "fuse_blocks")},
    "HeadroomLoadClipInt8": {"required": ("clip_name", "type", "weight_format", "skip_patterns"),
                             "optional": ("device", "min_features")},
    "HeadroomLoraLoaderInt8": {"required": ("model", "lora_name", "strength", "offload_to_cpu")},
    "HeadroomLoraLoaderInt8WithClip": {"required": ("model", "clip", "lora_name", "strength_model",
                                                    "strength_clip", "offload_to_cpu")},
    "HeadroomForceUnload": {"required": ("anything", "nuke_orphaned_tensors")},
    "HeadroomSoftUnload": {"required": ("anything", "model")},
    "HeadroomGpuInfo": {"required": (), "optional": ("anything",)},
    "HeadroomMemoryReport": {"required": ("model",), "optional": ("anything",)},
    "HeadroomDoctor": {"required": ("model_path", "gpu_budget_gb", "ram_budget_gb")},
}


@pytest.fixture(scope="module")
def baseline(files):
    files.run(graph(STOCK_UNET, "stock"))
    return latent(files, "stock")


def test_int8_model_samples_like_stock_bf16(files, baseline):
    g = graph(int8_loader(), "int8")
    g["8"] = {"class_type": "HeadroomMemoryReport", "inputs": {"model": ["4", 0], "anything": ["6", 0]}}
    entry = files.run(g)
    status = files.text_of(entry, "4")
    assert "10 INT8 linear layers" in status and "quantized while loading" in status, status
    assert "Peak RAM" in status
    report = files.text_of(entry, "8")
    assert "Peak RAM" in report and "INT8 kernels:" in report and "x0" not in report, report
    err = rel(latent(files, "int8"), baseline)
    assert 1e-6 < err < 0.05, err
    other_seed = files.run(graph(STOCK_UNET, "stock_seed8", seed=8))
    assert other_seed and rel(latent(files, "stock_seed8"), baseline) > 10 * err  # the metric can tell


def test_rotate_and_quantize_modulation_inputs(files, baseline):
    """The loader's advanced inputs through the real server: rotated INT8 and INT8 modulation still sample
    close to stock bf16, and the status says what was done."""
    entry = files.run(graph(int8_loader(rotate="128", quantize_modulation=True), "int8_rot"))
    status = files.text_of(entry, "4")
    assert "13 INT8 linear layers" in status and "13 of them Hadamard-rotated" in status, status
    err = rel(latent(files, "int8_rot"), baseline)
    assert 1e-6 < err < 0.05, err


def test_lora_on_int8_matches_stock_lora(files, baseline):
    ours = {"class_type": "HeadroomLoraLoaderInt8", "inputs": {"model": ["4", 0], "lora_name": "flux_tiny_lora.safetensors",
                                                              "strength": 1.0, "offload_to_cpu": False}}
    stock = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": "flux_tiny_lora.safetensors",
                                                            "strength_model": 1.0}}
    files.run(graph(STOCK_UNET, "stock_lora", lora=stock))
    entry = files.run(graph(int8_loader(), "int8_lora", lora=ours))
    assert "8 INT8 side branches" in files.text_of(entry, "9"), files.text_of(entry, "9")
    files.run(graph(int8_loader(), "int8_stocklora", lora=stock))  # ComfyUI's LoraLoader on our model
    ref = latent(files, "stock_lora")
    effect = rel(ref, baseline)
    for prefix in ("int8_lora", "int8_stocklora"):
        err = rel(latent(files, prefix), ref)
        assert err < 0.05 and effect > 3 * err, (prefix, err, effect)
    offload = dict(ours, inputs=dict(ours["inputs"], offload_to_cpu=True, strength=0.5))
    files.run(graph(int8_loader(), "int8_lora_half", lora=offload))
    assert rel(latent(files, "int8_lora_half"), latent(files, "int8_lora")) > 0.01


def test_int8_text_encoder_matches_clip_loader(files, baseline):
    ours = {"class_type": "HeadroomLoadClipInt8", "inputs": {"clip_name": "clip_l_tiny.safetensors",
                                                            "type": "stable_diffusion", "weight_format": "auto",
                                                            "skip_patterns": "", "min_features": 512}}
    entry = files.run(graph(STOCK_UNET, "int8_te", clip_node=ours))
    assert "72 INT8 linear layers" in files.text_of(entry, "1"), files.text_of(entry, "1")
    err = rel(latent(files, "int8_te"), baseline)
    assert 0 < err < 0.05, err


def test_force_unload_reports_what_it_freed(files):
    g = {
        "4": int8_loader(),
        "10": {"class_type": "HeadroomGpuInfo", "inputs": {"anything": ["4", 0]}},
        "11": {"class_type": "HeadroomForceUnload", "inputs": {"anything": ["10", 0], "nuke_orphaned_tensors": False}},
        "12": {"class_type": "HeadroomGpuInfo", "inputs": {"anything": ["11", 0]}},
    }
    entry = files.run(g)
    status = files.text_of(entry, "11")
    assert "Force unload:" in status and "caches cleared" in status, status
    assert "ComfyUI models unloaded" in status, status
    after = files.text_of(entry, "12")
    assert "ComfyUI loaded models: none" in after, after
    assert "RAM:" in files.text_of(entry, "10")


def test_lora_that_does_not_fit_is_refused_listing_layers(files):
    wrong = flux_lora_state_dict(flux_state_dict(hidden=512), targets=("attn.proj",))
    save_file(wrong, str(files.models("loras") / "wrong_size_lora.safetensors"))
    lora = {"class_type": "HeadroomLoraLoaderInt8", "inputs": {"model": ["4", 0], "lora_name": "wrong_size_lora.safetensors",
                                                              "strength": 1.0, "offload_to_cpu": False}}
    with pytest.raises(RuntimeError) as err:
        files.run(graph(int8_loader(), "never", lora=lora))
    message = str(err.value)
    assert "does not fit this model" in message and "double_blocks.0.img_attn.proj" in message, message
    assert "model was not changed" in message


def test_stock_unetloader_reads_our_comfy_layout_conversion(files, baseline):
    from comfyui_headroom.quant.convert import convert_file

    src = files.models("diffusion_models") / "flux_tiny.safetensors"
    dst = files.models("diffusion_models") / "flux_tiny_int8_comfy.safetensors"
    convert_file(src, dst, method="rowwise", layout="comfy", progress=False, overwrite=True)
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": dst.name, "weight_dtype": "default"}}
    files.run(graph(unet, "stock_reads_ours"))
    err = rel(latent(files, "stock_reads_ours"), baseline)
    assert 1e-6 < err < 0.05, err
