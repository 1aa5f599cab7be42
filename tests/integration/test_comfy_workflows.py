"""The bundled workflows (workflows/*.json, ours: not hunyuan3_*): they validate in ComfyUI and load in its
frontend with no missing node.

* API check: each UI-format graph is converted to an API prompt (tests/integration/workflow_tools.py) and
  POSTed to /prompt, which runs ComfyUI's own validation (node types, required inputs, value ranges, combo
  values - the model files it names exist as empty placeholders, so execution then stops at the first loader).
* Browser check: tests/browser/check_workflows.cjs opens the real frontend in headless Chromium
  (playwright-core), calls ``window.app.loadGraphData`` per workflow and lists node types missing from
  ``window.LiteGraph.registered_node_types``.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workflow_tools import load, ui_to_api

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if not p.name.startswith("hunyuan3_"))
FOLDERS = {"unet_name": "diffusion_models", "clip_name": "text_encoders", "vae_name": "vae", "lora_name": "loras"}


def test_there_are_four_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"wan22_int8_t2v.json", "zimage_int8_lora_t2i.json", "qwen_image_int8_te.json",
            "int8_force_unload.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_validates_against_object_info(comfyui_server, path):
    info = comfyui_server.object_info()
    workflow = load(path)
    prompt = ui_to_api(workflow, info)
    for node_id, node in prompt.items():
        required = info[node["class_type"]]["input"].get("required", {})
        missing = [name for name in required if name not in node["inputs"]]
        assert not missing, f"{path.name} node {node_id} ({node['class_type']}) lacks {missing}"
        for name, value in node["inputs"].items():
            if name in FOLDERS and isinstance(value, str):
                placeholder = comfyui_server.models(FOLDERS[name]) / value
                if not placeholder.exists():
                    placeholder.write_bytes(b"")
    # ComfyUI's own validation: a 400 with node_errors raises here
    prompt_id = comfyui_server.queue(prompt)
    with pytest.raises(RuntimeError, match="execution_error"):
        comfyui_server.wait(prompt_id, timeout=300)  # runs until the first loader meets an empty placeholder


def test_a_broken_prompt_is_rejected(comfyui_server):
    workflow = load(WORKFLOWS[0])
    prompt = ui_to_api(workflow, comfyui_server.object_info())
    loader = next(n for n in prompt.values() if n["class_type"] == "HeadroomLoadDiffusionModelInt8")
    loader["inputs"]["compute"] = "not-a-kernel"
    with pytest.raises(RuntimeError, match="compute"):
        comfyui_server.queue(prompt)


def _chromium():
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not os.environ.get("HEADROOM_PLAYWRIGHT_DIR"),
                    reason="HEADROOM_PLAYWRIGHT_DIR is not set (node_modules with playwright-core)")
@pytest.mark.skipif(not _chromium(), reason="chromium is not installed")
@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_workflows_load_in_the_frontend_without_missing_nodes(comfyui_server, tmp_path):
    broken = json.loads(WORKFLOWS[0].read_text())
    broken["nodes"][0]["type"] = "HeadroomNoSuchNode"  # the check must be able to fail
    broken_path = tmp_path / "broken.json"
    broken_path.write_text(json.dumps(broken))
    env = dict(os.environ, CHROMIUM=_chromium())
    out = subprocess.run(["node", str(REPO / "tests" / "browser" / "check_workflows.cjs"), comfyui_server.url,
                          *map(str, WORKFLOWS), str(broken_path)], capture_output=True, text=True, env=env, timeout=600)
    line = (out.stdout.strip().splitlines() or [""])[-1]
    result = json.loads(line) if line.startswith("{") else {"fatal": out.stdout + out.stderr}
    assert "fatal" not in result, result
    for path in WORKFLOWS:
        report = result["workflows"][path.name]
        assert report["missing"] == [], (path.name, report)
        assert report["loaded"] == report["nodes"], (path.name, report)
    assert result["workflows"]["broken.json"]["missing"] == ["HeadroomNoSuchNode"]
