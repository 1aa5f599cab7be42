"""Hunyuan 3 LoRA (category ``headroom/hunyuan3``): a LoRA from ComfyUI's ``loras`` folder on a HunyuanImage-3 model.

Thin: the work is ``integrations/hunyuan3/lora.py``. The node outputs the same loaded model object (the loader's
cached one: no copy of an 80B model) with the stack attached and recorded in ``LoadedModel.loras``.

Which stack: the node reads the chain of Hunyuan 3 LoRA nodes above it from ComfyUI's prompt graph (hidden
``PROMPT`` / ``UNIQUE_ID``), takes their widget values from the prompt, and applies that chain plus its own
entry. So when ComfyUI re-runs only this node (its strength changed) the result is the same as a full run, and
nothing is added twice. Without a prompt (a script) the node replaces its own earlier entry (by node identity).

All LoRA nodes hand on one shared model object, so what a generator samples with must be settled by the generator:
:func:`sync_for_generator` (its own input's chain from the graph; clears when the model comes straight from the
loader or the LoRA nodes were removed while the nodes above stayed cached) and, after a reload,
``integrations/hunyuan3/lora.reapply_after_reload``. ComfyUI is imported inside functions only.
"""

from __future__ import annotations

import os

from ..integrations.hunyuan3.lora import (
    LoraEntry,
    apply_stack,
    reapply_after_reload,
    stack_for_consumer,
    stack_for_node,
)
from .hunyuan3_types import CATEGORY, MODEL_TYPE

LORA_FOLDER = "loras"
STRENGTH_MIN, STRENGTH_MAX = -4.0, 4.0


def lora_choices() -> list[str]:
    """The .safetensors files of ComfyUI's ``loras`` folders (other files are pickles, which we never load)."""
    try:
        import folder_paths  # ComfyUI
    except ImportError:
        return []
    names = [n for n in folder_paths.get_filename_list(LORA_FOLDER) if n.lower().endswith(".safetensors")]
    return names or ["(put LoRA .safetensors files in models/loras)"]


def resolve_lora(name: str) -> str:
    """A name from the list -> its path; an absolute path is taken as it is (scripts, tests)."""
    if os.path.isabs(name) and os.path.exists(name):
        return name
    try:
        import folder_paths  # ComfyUI
    except ImportError:
        raise ValueError(f"LoRA {name!r}: not an existing absolute path, and ComfyUI's folder_paths is not "
                         "available to look it up") from None
    path = folder_paths.get_full_path(LORA_FOLDER, name)
    if not path:
        raise ValueError(f"LoRA {name!r} not found in the loras folders {folder_paths.get_folder_paths(LORA_FOLDER)}")
    return path


def node_stack(upstream, lora_name: str, strength: float, node, prompt=None) -> list[LoraEntry]:
    """The stack this node stands for (see the module docstring); ``node`` is its identity (ComfyUI's UNIQUE_ID,
    else the node instance)."""
    own = LoraEntry(resolve_lora(lora_name), float(strength), None if node is None else str(node), lora_name)
    return stack_for_node(upstream, own, prompt, resolve_lora)


def sync_for_generator(loaded, prompt=None, unique_id=None):
    """For a generator node (hidden ``PROMPT`` / ``UNIQUE_ID``), before sampling: the stack of the LoRA nodes that
    feed ITS model input, attached (``[]`` clears: a generator fed straight by the loader samples without LoRA,
    also after LoRA nodes were removed from the graph while the nodes above them stayed cached). Without a prompt
    the model's own stack (``loaded.loras``) is kept. Returns the report, or None when nothing changed."""
    stack = stack_for_consumer(prompt, unique_id, resolve_lora)
    if stack is not None and [(e.path, e.strength) for e in stack] != \
            [(e[0], float(e[1])) for e in (loaded.loras or [])]:
        return apply_stack(loaded, stack)
    return reapply_after_reload(loaded)


class Hunyuan3LoRA:
    """Adds one LoRA to the HunyuanImage-3 model's stack (chain several to stack them); no reload on changes."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "status")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "lora_name": (lora_choices(), {"tooltip": "A LoRA .safetensors file from models/loras (PEFT or "
                                               "kohya/diffusers keys for HunyuanImage-3's attention, shared and "
                                               "routed experts)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": STRENGTH_MIN, "max": STRENGTH_MAX, "step": 0.01,
                                       "tooltip": "0 = off. Changing it needs no reload."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, strength=1.0, **kwargs):
        """A LoRA file rewritten on disk runs the node again."""
        try:
            stat = os.stat(resolve_lora(lora_name))
            return f"{lora_name}:{stat.st_size}:{stat.st_mtime_ns}:{strength}"
        except (ValueError, OSError):
            return f"{lora_name}:{strength}"

    def apply(self, model, lora_name, strength, unique_id=None, prompt=None):
        node = unique_id if unique_id is not None else f"instance-{id(self)}"
        stack = node_stack(getattr(model, "loras", None) or [], lora_name, strength, node, prompt)
        report = apply_stack(model, stack)
        if report is not None:
            status = report.summary()
        else:
            status = "LoRA stack recorded; it is attached when the model loads again:\n" + "\n".join(
                f"{os.path.basename(e.path)} x {e.strength:g}" for e in stack)
        return {"ui": {"text": [status]}, "result": (model, status)}


NODE_CLASS_MAPPINGS: dict = {"Hunyuan3LoRA": Hunyuan3LoRA}
NODE_DISPLAY_NAME_MAPPINGS: dict = {"Hunyuan3LoRA": "Hunyuan 3 LoRA"}
