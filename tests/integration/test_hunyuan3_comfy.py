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
