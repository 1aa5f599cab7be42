"""Thin ComfyUI nodes: parse inputs, call the core, format outputs and a status line.

Each node module exports ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; they are merged here.
Node modules must not import ComfyUI at module level (the package imports without it).
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
