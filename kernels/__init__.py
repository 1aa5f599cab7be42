"""INT8 matmul kernels and the dispatcher that picks one per call.

Public entry points:
* :func:`int8_linear` - what :class:`~comfyui_headroom.quant.Int8Linear` calls in its forward;
* :func:`force_kernel` / :func:`forced_kernel` - override the automatic choice (setter or ``with``);
* :func:`kernel_summary` / :func:`reset_kernel_stats` - which kernel ran how often, per shape;
* :func:`choose_kernel` - which kernel a call would use on this machine;
* :func:`reload_env` - re-read the ``HEADROOM_*`` / ``TRITON_INTERPRET`` variables (read once at import);
* :func:`grouped_int8_linear`, :func:`grouped_float_linear`, :func:`silu_gate_quantize`, :func:`silu_gate`,
  :func:`group_offsets_from_counts` - Mixture-of-Experts layers, all experts in one call (:mod:`.grouped`).

Importing the package itself loads nothing heavy (PEP 562), so that :mod:`.constants` - the methods, block size and
rotation groups the command line shows - comes without torch. The first of the names above that is asked for loads
them all and registers the ``torch.ops.headroom.*`` custom ops (see :mod:`.ops`); the MoE names load only
:mod:`.grouped`.
"""

__all__ = [
    "KERNELS",
    "choose_kernel",
    "force_kernel",
    "forced_kernel",
    "group_offsets_from_counts",
    "grouped_float_linear",
    "grouped_int8_linear",
    "int8_linear",
    "kernel_summary",
    "reload_env",
    "reset_kernel_stats",
    "silu_gate",
    "silu_gate_quantize",
]

# Loaded from .grouped alone: the MoE names need neither the dispatcher nor the custom ops.
_GROUPED = ("group_offsets_from_counts", "grouped_float_linear", "grouped_int8_linear", "silu_gate",
            "silu_gate_quantize")


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _GROUPED:
        from . import grouped

        globals().update({n: getattr(grouped, n) for n in _GROUPED})
        return globals()[name]
    from . import ops  # noqa: F401  (registers torch.ops.headroom.*)
    from .backends import KERNELS
    from .dispatch import (
        choose_kernel,
        force_kernel,
        forced_kernel,
        int8_linear,
        kernel_summary,
        reload_env,
        reset_kernel_stats,
    )

    globals().update(KERNELS=KERNELS, choose_kernel=choose_kernel, force_kernel=force_kernel,
                     forced_kernel=forced_kernel, int8_linear=int8_linear, kernel_summary=kernel_summary,
                     reload_env=reload_env, reset_kernel_stats=reset_kernel_stats)
    return globals()[name]
