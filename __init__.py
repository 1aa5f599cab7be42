"""comfyui-headroom: INT8 / NF4 diffusion models under a VRAM budget.

ComfyUI imports this file from its custom_nodes folder and reads ``NODE_CLASS_MAPPINGS``; as the pip
package ``comfyui_headroom`` it is the library root. The node mappings are imported on first access (PEP 562),
so ``import comfyui_headroom.cli`` - every ``headroom`` command, ``--help`` included - does not pay for torch and
the node classes; the node classes themselves import ComfyUI lazily, so this file imports cleanly without it.
"""

from ._version import __version__

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]


def __getattr__(name: str):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
