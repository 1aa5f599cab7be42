"""Memory nodes: force unload, soft unload (park in RAM), GPU info, memory report of the last run.

Thin nodes over :mod:`..memory` and ComfyUI's model management (imported inside the functions).
"""

from __future__ import annotations

import logging

import torch

from ..units import GB

log = logging.getLogger("comfyui_headroom")

CATEGORY = "headroom"
ANY = "*"

def _ui(status: str, *outputs):
    return {"ui": {"text": [status]}, "result": (*outputs, status)}


def _loaded_models() -> list[str]:
    """One line per model ComfyUI holds: class, where, how much of it is on the device."""
    try:
        import comfy.model_management as mm
    except Exception:  # outside ComfyUI
        return []
    lines = []
    for loaded in list(mm.current_loaded_models):
        patcher = loaded.model
        if patcher is None:
            continue
        inner = getattr(patcher, "model", None)
        name = type(inner).__name__ if inner is not None else type(patcher).__name__
        try:
            on_device = patcher.loaded_size()
            total = patcher.model_size()
        except Exception:
            on_device, total = 0, 0
        lines.append(f"{name} on {loaded.device}: {on_device / GB:.2f} of {total / GB:.2f} GB loaded")
    return lines


def gpu_info_text() -> str:
    from ..memory import default_budget_bytes

    lines = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name} (sm{props.major}{props.minor}): {free / GB:.2f} GB free of "
                         f"{total / GB:.2f} GB; torch allocated {torch.cuda.memory_allocated(i) / GB:.2f} GB, "
                         f"reserved {torch.cuda.memory_reserved(i) / GB:.2f} GB; default weight budget "
                         f"{default_budget_bytes(total) / GB:.1f} GB")
    else:
        lines.append("no CUDA device (CPU only)")
    try:
        import psutil

        vm = psutil.virtual_memory()
        rss = psutil.Process().memory_info().rss
        lines.append(f"RAM: {vm.available / GB:.1f} GB available of {vm.total / GB:.1f} GB; this process "
                     f"{rss / GB:.2f} GB")
    except Exception:
        pass
    models = _loaded_models()
    lines.append("ComfyUI loaded models: " + ("; ".join(models) if models else "none"))
    return "\n".join(lines)


class HeadroomForceUnload:
    """Force Unload (Nuclear)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "anything": (ANY, {"tooltip": "Any value; passed through unchanged. Connect it to what must be "
                                              "finished before the unload (e.g. the saved image)."}),
                "nuke_orphaned_tensors": ("BOOLEAN", {"default": False, "tooltip":
                    "Also free CUDA tensors that nothing reachable holds any more (after an OOM). Risky: models "
                    "held only by other nodes' caches lose their weights and are reloaded next run."}),
            },
        }

    RETURN_TYPES = (ANY, "STRING")
    RETURN_NAMES = ("anything", "status")
    OUTPUT_TOOLTIPS = ("The input, unchanged.", "VRAM before/after and what was freed.")
    FUNCTION = "unload"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Gives VRAM back: unloads every model ComfyUI holds, drops headroom's caches, clears the "
                   "traceback of a failed run that pins tensors, runs GC and empties the CUDA cache.")

    def unload(self, anything, nuke_orphaned_tensors):
        from ..integrations.comfyui.memory import unload_comfy_models
        from ..memory import force_unload

        keep = [anything]
        report = force_unload(keep=keep, nuke_orphaned_tensors=bool(nuke_orphaned_tensors),
                              host_unload=unload_comfy_models)
        status = str(report)
        if report.before:
            status += f" | freed {report.freed_bytes() / GB:.2f} GB"
        log.info("headroom: %s", status)
        return _ui(status, anything)


class HeadroomSoftUnload:
    """Soft Unload (park in RAM)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "anything": (ANY, {"tooltip": "Any value; passed through unchanged (run the unload after it)."}),
                "model": ("MODEL", {"tooltip": "The model to take off the GPU."}),
            },
        }

    RETURN_TYPES = (ANY, "STRING")
    RETURN_NAMES = ("anything", "status")
    OUTPUT_TOOLTIPS = ("The input, unchanged.", "How much was parked and how fast.")
    FUNCTION = "park"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Asks ComfyUI to unload the model from the GPU and parks its weights in pinned RAM, so the next "
                   "run brings it back at PCIe speed instead of reading the file again.")

    def park(self, anything, model):
        import comfy.model_management as mm

        from ..memory import soft_unload

        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        held = sum(1 for m in mm.current_loaded_models if m.model is not None and m.model.model is model.model)
        mm.unload_model_and_clones(model, all_devices=True)  # ComfyUI's own bookkeeping, clones included
        handle = soft_unload(model.model)
        after = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        status = (f"{type(model.model).__name__}: unloaded ({held} loaded copies); parked {handle}; "
                  f"VRAM allocated {before / GB:.2f} -> {after / GB:.2f} GB")
        log.info("headroom: %s", status)
        return _ui(status, anything)


class HeadroomGpuInfo:
    """GPU Info."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "anything": (ANY, {"tooltip": "Optional: connect anything to read the state after it ran."})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("Devices, free/total memory, RAM, and the models ComfyUI holds.",)
    FUNCTION = "info"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "Shows each GPU's free/total memory, RAM, and what ComfyUI has loaded where."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always re-run: memory changes between runs

    def info(self, anything=None):
        text = gpu_info_text()
        return {"ui": {"text": [text]}, "result": (text,)}


class HeadroomMemoryReport:
    """Memory Report."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "A model loaded by Load Diffusion Model (INT8)."})},
                "optional": {"anything": (ANY, {"tooltip": "Connect the sampler's output so the report is read "
                                                           "after the run."})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Peak VRAM / RAM / time and INT8 kernels of the model's last sampling run.",)
    FUNCTION = "report"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "MemoryTracker status of the last sampling run of a model loaded by headroom's INT8 loader."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def report(self, model, anything=None):
        from ..integrations.comfyui.sampling import last_run_of

        run = last_run_of(model)
        if run is None:
            text = "no sampling run recorded for this model yet (load it with Load Diffusion Model (INT8) and sample)"
        else:
            kernels = ", ".join(f"{name} x{entry['calls']}" for name, entry in run["kernels"].items()) or "none"
            text = f"{run['report']} | compute {run['compute']} | INT8 kernels: {kernels}"
            if run.get("placement"):
                text += f" | {run['placement']}"
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS: dict = {
    "HeadroomForceUnload": HeadroomForceUnload,
    "HeadroomSoftUnload": HeadroomSoftUnload,
    "HeadroomGpuInfo": HeadroomGpuInfo,
    "HeadroomMemoryReport": HeadroomMemoryReport,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "HeadroomForceUnload": "Force Unload (Nuclear)",
    "HeadroomSoftUnload": "Soft Unload (park in RAM)",
    "HeadroomGpuInfo": "GPU Info",
    "HeadroomMemoryReport": "Memory Report",
}
