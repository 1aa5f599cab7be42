"""The HunyuanImage-3 nodes in a real ComfyUI: loader -> generator -> SaveImage on the tiny fake model.

Uses the session's ``comfyui_server`` (tests/integration/conftest.py). The fake folder goes to
``models/hunyuan3/`` - the folder type our nodes register - and is picked from the loader's dropdown.
"""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hunyuan3_fake"
NODES = ["Hunyuan3LoaderInt8Budget", "Hunyuan3LoaderNF4LowVram", "Hunyuan3LoaderBF16Budget",
         "Hunyuan3GenerateLargeBudget", "Hunyuan3GenerateLowVramBudget"]



@pytest.fixture(scope="module")
def server(comfyui_server):
    spec = importlib.util.spec_from_file_location("hunyuan3_build_fake", FIXTURE / "build_fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_fake_model_folder(comfyui_server.models("hunyuan3") / "hy3-fake")
    return comfyui_server


def graph(loader="Hunyuan3LoaderInt8Budget", generator="Hunyuan3GenerateLargeBudget", prefix="hy3", post="keep"):
    return {
        "1": {"class_type": loader, "inputs": {"model_folder": "hy3-fake", "gpu_budget_gb": 0.0,
                                               "external_vram_gb": 0.0, "trust_remote_code": True,
                                               "attn_implementation": "sdpa"}},
        "2": {"class_type": generator, "inputs": {"model": ["1", 0], "prompt": "a red fox", "seed": 5, "steps": 2,
                                                  "guidance": 2.0, "width": 64, "height": 64,
                                                  "offload_mode": "smart", "post_action": post}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def test_nodes_are_listed_with_the_model_folder(server):
    info = server.object_info()
    for name in NODES:
        assert name in info and info[name]["category"] == "headroom/hunyuan3", name
    choices = info["Hunyuan3LoaderInt8Budget"]["input"]["required"]["model_folder"][0]
    assert "hy3-fake" in choices


def test_loader_generator_save_image(server):
    entry = server.run(graph(prefix="hy3_int8"), timeout=600)
    images = entry["outputs"]["3"]["images"]
    assert images and images[0]["filename"].startswith("hy3_int8")
    png = server.output / images[0].get("subfolder", "") / images[0]["filename"]
    from PIL import Image

    with Image.open(png) as img:
        assert img.size == (64, 64)
    status = server.text_of(entry, "2")
    assert status.endswith("GB") and "Peak VRAM" in status and "Peak RAM" in status
    report = server.text_of(entry, "1")
    assert "dtype report" in report and "INT8" in report


def test_unload_then_run_again_reloads(server):
    first = server.run(graph(prefix="hy3_a", post="unload"), timeout=600)
    assert "unloaded" in server.text_of(first, "2")
    again = graph(prefix="hy3_b")
    again["2"]["inputs"]["seed"] = 6  # the loader's output is reused by ComfyUI; the generator reloads
    entry = server.run(again, timeout=600)
    assert entry["outputs"]["3"]["images"][0]["filename"].startswith("hy3_b")
    assert "reloaded" in server.text_of(entry, "2")


@pytest.mark.parametrize("engine, says", [("headroom", "headroom-int8"), ("bitsandbytes", "bitsandbytes-int8")])
def test_int8_engine_choice_reaches_the_loader(server, engine, says):
    g = graph(prefix=f"hy3_{engine}")
    g["1"]["inputs"]["int8_engine"] = engine
    entry = server.run(g, timeout=600)
    assert says in server.text_of(entry, "1")
    assert entry["outputs"]["3"]["images"][0]["filename"].startswith(f"hy3_{engine}")


def _write_lora(path: Path, layer: str, out_features: int, in_features: int, rank: int = 4) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{layer}.lora_A.weight": torch.randn(rank, in_features, generator=g) * 0.1,
               f"base_model.model.{layer}.lora_B.weight": torch.randn(out_features, rank, generator=g) * 0.1},
              str(path))


def test_lora_node_between_loader_and_generator(server):
    loras = server.models("loras")
    loras.mkdir(parents=True, exist_ok=True)
    _write_lora(loras / "hy3_test_lora.safetensors", "model.layers.0.self_attn.qkv_proj", 3 * 4 * 32, 128)
    g = graph(prefix="hy3_lora")
    g["4"] = {"class_type": "Hunyuan3LoRA", "inputs": {"model": ["1", 0], "lora_name": "hy3_test_lora.safetensors",
                                                        "strength": 0.8}}
    g["2"]["inputs"]["model"] = ["4", 0]
    entry = server.run(g, timeout=600)
    status = server.text_of(entry, "4")
    assert "hy3_test_lora.safetensors" in status
    assert entry["outputs"]["3"]["images"][0]["filename"].startswith("hy3_lora")
    plain = server.run(graph(prefix="hy3_nolora"), timeout=600)  # straight from the loader: the stack is dropped
    assert plain["outputs"]["3"]["images"][0]["filename"].startswith("hy3_nolora")
