"""ComfyUI's side of giving VRAM back: the host unload that :func:`comfyui_headroom.memory.force_unload` calls
when the Force Unload node runs inside ComfyUI."""

from __future__ import annotations

import logging

log = logging.getLogger("comfyui_headroom")


def unload_comfy_models() -> str | None:
    """Ask ComfyUI's model management to unload every model and empty its cache.

    Returns what was done (for the force-unload report), or None where ComfyUI's model management cannot be
    imported (outside ComfyUI). A step that fails is logged and the next one still runs."""
    try:
        import comfy.model_management as mm
    except Exception as err:  # ComfyUI not importable here
        log.debug("ComfyUI model management unavailable: %s", err)
        return None
    done = False
    for fn_name in ("unload_all_models", "soft_empty_cache"):
        fn = getattr(mm, fn_name, None)
        if fn is None:
            continue
        try:
            fn()
            done = True
        except Exception as err:
            log.warning("ComfyUI %s failed: %s", fn_name, err)
    return "ComfyUI models unloaded" if done else None
