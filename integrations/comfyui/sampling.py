"""Around every ComfyUI sampling run of an INT8 MODEL: what the run used (peak memory, kernel calls).

``Load Diffusion Model (INT8)`` has a ``compute`` input (auto / triton / int_mm / w8a16 / reference). It belongs to
the model it was chosen for: the load's :class:`~comfyui_headroom.integrations.comfyui.ops.Int8LoadConfig` carries
it and each of the model's INT8 layers applies it to its own calls (``ops._int8_forward``), so two models in one
graph - or one process - each run their own kernel, whatever samples when. This wrapper only records each run
(ComfyUI's ``OUTER_SAMPLE``): its peak memory, kernel calls and block placement (GPU / RAM / disk tiers, disk read
rate), per model, for the Memory Report node (:func:`last_run_of`).
"""

from __future__ import annotations

import logging
import weakref

from ...kernels.dispatch import COMPUTE_CHOICES, kernel_summary, reset_kernel_stats
from ...memory import MemoryTracker, streamer_of

__all__ = ["COMPUTE_CHOICES", "install_sampling_wrapper", "last_run_of"]

log = logging.getLogger("comfyui_headroom")

_LAST_RUN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def install_sampling_wrapper(patcher, compute: str, oom_advice=None) -> None:
    """Track memory and kernel calls during ``patcher``'s runs; ``compute`` (applied by the layers themselves) is
    recorded with them. ``oom_advice()`` -> text appended to an out-of-memory error of a run (the placement plan
    and what to change, :func:`comfyui_headroom.memory.doctor.oom_advice`)."""
    import comfy.patcher_extension
    import torch

    def outer_sample(executor, *args, **kwargs):
        reset_kernel_stats()
        with MemoryTracker() as tracker:
            try:
                out = executor(*args, **kwargs)
            except torch.OutOfMemoryError as err:
                if oom_advice is None:
                    raise
                raise torch.OutOfMemoryError(f"{err}\n\nheadroom: {oom_advice()}") from err
        model = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
        model = getattr(model, "model", None) or patcher.model
        streamer = streamer_of(getattr(model, "diffusion_model", None) or model)
        _LAST_RUN[model] = {"report": tracker.report, "kernels": kernel_summary(), "compute": compute,
                            "placement": streamer.summary() if streamer is not None else None}
        log.info("headroom sampling run: %s", tracker.report)
        return out

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "headroom_int8", outer_sample)


def last_run_of(model_patcher) -> dict | None:
    """``{"report", "kernels", "compute", "placement"}`` of the last sampling run of this MODEL, or None
    (``placement``: headroom's block streaming after the run - blocks per tier, disk read rate - or None)."""
    return _LAST_RUN.get(getattr(model_patcher, "model", None))
