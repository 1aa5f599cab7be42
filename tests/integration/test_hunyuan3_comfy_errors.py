"""A user's mistake in a real ComfyUI: the HunyuanImage-3 loader node fails with our one-line message (the
exception ComfyUI shows in the UI), not an AttributeError from deep inside a load."""

import math

import pytest
from hunyuan3_fake import build_fake_folder  # tests/, on the path through tests/integration/conftest.py

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def server(comfyui_server):
    root = comfyui_server.models("hunyuan3")
    if not (root / "hy3-fake").exists():
        build_fake_folder(root / "hy3-fake")
    (root / "hy3-list-config").mkdir(exist_ok=True)
    (root / "hy3-list-config" / "config.json").write_text("[1, 2]")
    return comfyui_server


def _error_of(server, folder: str, budget: float) -> dict:
    prompt = {"1": {"class_type": "Hunyuan3LoaderInt8Budget",
                    "inputs": {"model_folder": folder, "gpu_budget_gb": budget, "external_vram_gb": 0.0,
                               "trust_remote_code": True, "attn_implementation": "sdpa"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    prompt_id = server.queue(prompt)
    with pytest.raises(RuntimeError, match="prompt failed"):
        server.wait(prompt_id, timeout=300)
    messages = server.get(f"/history/{prompt_id}")[prompt_id]["status"]["messages"]
    return next(m[1] for m in messages if m[0] == "execution_error")


@pytest.mark.parametrize("folder, budget, expected", [
    ("hy3-list-config", 0.0, "hy3-list-config/config.json: holds a JSON list ([1, 2]), not an object"),
    ("hy3-fake", math.nan, "gpu_budget_gb=nan: give a number of GB from 0 to 1024"),  # ComfyUI's range check passes NaN
])
def test_the_node_fails_with_the_one_line_message(server, folder, budget, expected):
    error = _error_of(server, folder, budget)
    assert error["exception_type"].endswith("LoaderError"), error["exception_type"]
    assert expected in error["exception_message"] and "\n" not in error["exception_message"].strip()
