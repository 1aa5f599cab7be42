"""Byte units, in one place: every layer counts memory in GiB (2**30 bytes) and prints it the same way.

A ground module like ``_version``: it imports nothing of ours, so every layer may use it."""

GB = 2**30  # what our budgets, reports and nodes call a GB (a GiB)
MB = 2**20
MAX_GPU_GB = 1024  # the largest VRAM budget for one GPU that is a budget and not a typo: no card has a terabyte


def format_gib(n: int) -> str:
    """``1.50 GiB`` from 1 GiB up, else ``512.0 MiB``: sizes of files and tensors in reports."""
    return f"{n / GB:.2f} GiB" if n >= GB else f"{n / MB:.1f} MiB"
