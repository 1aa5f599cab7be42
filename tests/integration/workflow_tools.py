"""UI-format workflows (what the ComfyUI frontend saves and loads) <-> API-format prompts, driven by /object_info.

* :class:`WorkflowBuilder` writes UI-format graphs (nodes with ``widgets_values``, links as
  ``[id, from_node, from_slot, to_node, to_slot, type]``); it is how workflows/*.json were made.
* :func:`ui_to_api` converts such a graph to an API prompt the way the frontend does: each widget input
  takes the next ``widgets_values`` entry in /object_info's input order (an INT seed with
  ``control_after_generate`` is followed by its control value, which is skipped), link inputs become
  ``[node_id, slot]``.
"""

from __future__ import annotations

import json

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            out.append((name, spec, section == "required"))
    return out


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control(spec) -> bool:
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("control_after_generate"))


class WorkflowBuilder:
    def __init__(self, object_info: dict) -> None:
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, class_type: str, pos=(0, 0), title: str | None = None, inputs: dict | None = None,
             **widgets) -> dict:
        info = self.info[class_type]
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": class_type, "pos": list(pos), "size": [320, 120], "flags": {},
                "order": node_id - 1, "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": class_type}, "widgets_values": []}
        if title:
            node["title"] = title
        inputs = inputs or {}
        for name, spec, required in _ordered_inputs(info):
            if is_widget(spec) and name not in inputs:
                if name in widgets:
                    value = widgets[name]
                elif len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                    value = spec[1]["default"]
                elif isinstance(spec[0], list) and spec[0]:
                    value = spec[0][0]
                else:
                    raise ValueError(f"{class_type}.{name}: give a value")
                node["widgets_values"].append(value)
                if has_control(spec):
                    node["widgets_values"].append("fixed")
                continue
            entry = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": None}
            if is_widget(spec):
                entry["widget"] = {"name": name}
            node["inputs"].append(entry)
            if name in inputs:
                src, slot = inputs[name]
                self._link(src, slot, node, len(node["inputs"]) - 1)
        names = info.get("output_name", info["output"])
        for slot, kind in enumerate(info["output"]):
            node["outputs"].append({"name": names[slot], "type": kind, "links": [], "slot_index": slot})
        self.nodes.append(node)
        return node

    def _link(self, src: dict, slot: int, dst: dict, dst_slot: int) -> None:
        link_id = len(self.links) + 1
        kind = src["outputs"][slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], dst_slot, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][dst_slot]["link"] = link_id

    def to_json(self, note: str = "") -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"headroom_note": note, "ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt of a UI-format workflow (KeyError when a node type is unknown to the server)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec, _ in _ordered_inputs(info):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
                if is_widget(spec) and any(i.get("widget", {}).get("name") == name for i in node["inputs"]):
                    continue
            if is_widget(spec) and name not in linked:
                if not values:
                    break
                inputs[name] = values.pop(0)
                if has_control(spec) and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
