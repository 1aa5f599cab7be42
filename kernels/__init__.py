"""INT8 matmul kernels and the dispatcher that picks one per call.

Public entry points:
* :func:`int8_linear` - what :class:`~comfyui_headroom.quant.Int8Linear` calls in its forward;
* :func:`kernel_summary` / :func:`reset_kernel_stats` - which kernel ran how often, per shape.
"""

from .dispatch import int8_linear, kernel_summary, reset_kernel_stats

__all__ = ["int8_linear", "kernel_summary", "reset_kernel_stats"]
