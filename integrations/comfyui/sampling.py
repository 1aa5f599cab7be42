"""Around every ComfyUI sampling run of an INT8 MODEL: the loader's kernel choice, and what the run used.

``Load Diffusion Model (INT8)`` has a ``compute`` input (auto / triton / int_mm / w8a16 / reference). It is
applied for the duration of each sampling run through ComfyUI's ``OUTER_SAMPLE`` wrapper, so two models in one
graph can sample with different kernels; the run's peak memory and kernel calls are kept per model for the
GPU Info node (:func:`last_run_of`). The kernel choice is process-wide while a run lasts (docs/comfyui.md).
"""

from __future__ import annotations

import logging
import weakref

from ...kernels.dispatch import COMPUTE_CHOICES, force_kernel, forced_kernel, kernel_summary, reset_kernel_stats
from ...memory import MemoryTracker

__all__ = ["COMPUTE_CHOICES", "install_sampling_wrapper", "last_run_of"]

log = logging.getLogger("comfyui_headroom")

_LAST_RUN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def install_sampling_wrapper(patcher, compute: str) -> None:
    """Force kernel ``compute`` ("auto" = the dispatcher decides) and track memory during ``patcher``'s runs."""
    import comfy.patcher_extension

    def outer_sample(executor, *args, **kwargs):
        previous = forced_kernel()
        reset_kernel_stats()
        force_kernel(None if compute == "auto" else compute)
        try:
            with MemoryTracker() as tracker:
                out = executor(*args, **kwargs)
        finally:
            force_kernel(previous)
        model = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
        model = getattr(model, "model", None) or patcher.model
        _LAST_RUN[model] = {"report": tracker.report, "kernels": kernel_summary(), "compute": compute}
        log.info("headroom sampling run: %s", tracker.report)
        return out

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "headroom_int8", outer_sample)


def last_run_of(model_patcher) -> dict | None:
    """``{"report", "kernels", "compute"}`` of the last sampling run of this MODEL, or None."""
    return _LAST_RUN.get(getattr(model_patcher, "model", None))
