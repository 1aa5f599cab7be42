"""Widget values shared by several nodes, parsed one way everywhere."""

from __future__ import annotations

# Hadamard group sizes a node offers ("none" = no rotation); quant/rotation.py checks them.
ROTATIONS = ["none", "256", "64", "16", "128"]


def skip_list(text: str) -> list[str]:
    """Skip patterns from a comma- or newline-separated text widget."""
    return [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]


def rotation_group(choice: str | None) -> int:
    """A ``ROTATIONS`` value as the group size (0 = no rotation)."""
    return 0 if choice in ("none", "", None) else int(choice)
