"""comfyui-headroom: INT8 / NF4 diffusion models under a VRAM budget.

ComfyUI imports this file from its custom_nodes folder and reads ``NODE_CLASS_MAPPINGS``; as the pip
package ``comfyui_headroom`` it is the library root. The node classes import ComfyUI lazily, so this
file imports cleanly without ComfyUI (tests, CLI).
"""

from ._version import __version__
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
