"""memory_nodes: ComfyUI nodes (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
