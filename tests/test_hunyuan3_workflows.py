"""workflows/hunyuan3_*.json: UI-format graphs whose node types and widget values fit our nodes' inputs."""

import json
from pathlib import Path

import pytest

from comfyui_headroom.nodes.hunyuan3_lora_node import NODE_CLASS_MAPPINGS as LORA_NODES
from comfyui_headroom.nodes.hunyuan3_nodes import NODE_CLASS_MAPPINGS as LOADER_NODES

NODE_CLASS_MAPPINGS = {**LOADER_NODES, **LORA_NODES}

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("hunyuan3_*.json"))
CORE = {"SaveImage", "PreviewAny"}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def widget_names(cls):
    """Inputs the frontend draws as widgets, in order; INT 'seed' gets control_after_generate after it."""
    names = []
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append(name)
                if name == "seed":
                    names.append("control_after_generate")
    return names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_our_nodes(path, monkeypatch):
    from comfyui_headroom.nodes import hunyuan3_lora_node, hunyuan3_nodes

    monkeypatch.setattr(hunyuan3_nodes, "model_folder_choices", lambda: ["HunyuanImage-3"])
    monkeypatch.setattr(hunyuan3_lora_node, "lora_choices", lambda: ["hunyuan3_style_lora.safetensors"])
    data = json.loads(path.read_text())
    assert {"nodes", "links", "last_node_id", "last_link_id", "version"} <= set(data)
    ids = {n["id"] for n in data["nodes"]}
    ours = 0
    for node in data["nodes"]:
        if node["type"] in CORE:
            continue
        cls = NODE_CLASS_MAPPINGS[node["type"]]
        ours += 1
        names = widget_names(cls)
        assert len(node["widgets_values"]) == len(names), (node["type"], names)
        spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        for name, value in zip(names, node["widgets_values"]):
            if name == "control_after_generate":
                continue
            kind = spec[name][0]
            if isinstance(kind, list):
                assert value in kind, (node["type"], name, value)
            elif kind in ("INT", "FLOAT"):
                opts = spec[name][1]
                assert opts["min"] <= value <= opts["max"], (name, value)
    assert ours == (3 if any(n["type"] in LORA_NODES for n in data["nodes"]) else 2)
    for link in data["links"]:
        _, src, _, dst, _, _ = link
        assert src in ids and dst in ids
