"""Widget values shared by several nodes, parsed one way everywhere."""

from __future__ import annotations

from ..kernels.rotation import COMFY_ROTATION_GROUPS, ROTATION_GROUPS

# Hadamard group sizes a node offers ("none" = no rotation): those stock ComfyUI reads first, largest first, then
# the ones only headroom reads (kernels/rotation.py owns the list and checks a group).
ROTATIONS = ["none"] + [str(g) for g in sorted(COMFY_ROTATION_GROUPS, reverse=True)] + \
    [str(g) for g in sorted(set(ROTATION_GROUPS) - set(COMFY_ROTATION_GROUPS), reverse=True)]


def skip_list(text: str) -> list[str]:
    """Skip patterns from a comma- or newline-separated text widget."""
    return [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]


def rotation_group(choice: str | None) -> int:
    """A ``ROTATIONS`` value as the group size (0 = no rotation)."""
    return 0 if choice in ("none", "", None) else int(choice)
