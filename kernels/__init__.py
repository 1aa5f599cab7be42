"""INT8 matmul kernels and the dispatcher that picks one per call.

Public entry points:
* :func:`int8_linear` - what :class:`~comfyui_headroom.quant.Int8Linear` calls in its forward;
* :func:`force_kernel` / :func:`forced_kernel` - override the automatic choice (setter or ``with``);
* :func:`kernel_summary` / :func:`reset_kernel_stats` - which kernel ran how often, per shape;
* :func:`choose_kernel` - which kernel a call would use on this machine;
* :func:`reload_env` - re-read the ``HEADROOM_*`` / ``TRITON_INTERPRET`` variables (read once at import).

Importing the package itself loads nothing heavy (PEP 562), so that :mod:`.constants` - the methods, block size and
rotation groups the command line shows - comes without torch. The first of the names above that is asked for loads
them all and registers the ``torch.ops.headroom.*`` custom ops (see :mod:`.ops`).
"""

__all__ = [
    "KERNELS",
    "choose_kernel",
    "force_kernel",
    "forced_kernel",
    "int8_linear",
    "kernel_summary",
    "reload_env",
    "reset_kernel_stats",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
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
