"""save_nodes: ComfyUI nodes that write INT8 files (see nodes/__init__.py)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
