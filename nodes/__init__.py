"""Thin ComfyUI nodes: parse inputs, call the core, format outputs and a status line.

Each node module exports ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; they are merged here.
Node modules must not import ComfyUI at module level (the package imports without it).
"""

from . import doctor_node, hunyuan3_lora_node, hunyuan3_nodes, memory_nodes, native_nodes, save_nodes

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (native_nodes, memory_nodes, hunyuan3_nodes, hunyuan3_lora_node, save_nodes, doctor_node):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
