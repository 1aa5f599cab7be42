"""Save INT8 Model: write the MODEL of a graph - LoRAs and other weight patches merged - as an INT8 file.

Thin node: it turns ComfyUI's model patcher into a lazy tensor source (one patched weight at a time,
computed by ComfyUI's own ``comfy.lora.calculate_weight``) and hands it to the converter's writer
(:func:`..quant.convert.convert_source`): same skip rules, same streaming write, same atomic rename as
``headroom convert``. No second full copy of the model is made in RAM.
"""

from __future__ import annotations

import logging
import os

import torch

from .inputs import ROTATIONS, rotation_group, skip_list

log = logging.getLogger("comfyui_headroom")

CATEGORY = "headroom"
METHODS = ["rowwise", "block", "tensorwise"]
DESTINATIONS = ["diffusion_models", "output"]
DIFFUSION_PREFIX = "diffusion_model."


def patched_weight_function(patcher):
    """``patch(key, weight_float32)``: the patcher's patches on one diffusion-model weight, via ComfyUI's code."""
    import comfy.lora

    patches = getattr(patcher, "patches", {}) or {}

    def patch(key: str, weight: torch.Tensor) -> torch.Tensor:
        full = DIFFUSION_PREFIX + key
        if full not in patches:
            return weight
        return comfy.lora.calculate_weight(patches[full], weight, full, intermediate_dtype=torch.float32)

    return patch


def patched_key_count(patcher) -> int:
    return sum(1 for k in (getattr(patcher, "patches", {}) or {}) if k.startswith(DIFFUSION_PREFIX))


def output_path(filename_prefix: str, destination: str) -> str:
    """``<folder>/<prefix>_00001_.safetensors`` in ComfyUI's output or first diffusion_models folder."""
    import folder_paths

    if destination == "output":
        base = folder_paths.get_output_directory()
    else:
        base = folder_paths.get_folder_paths("diffusion_models")[0]
    folder, filename, counter, _subfolder, _ = folder_paths.get_save_image_path(filename_prefix, base)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{filename}_{counter:05}_.safetensors")


def save_int8_model(patcher, dst: str, method: str = "rowwise", rotate: int = 0, layout: str = "headroom",
                    skip=None, progress: bool = False):
    """Write ``patcher``'s diffusion model with its patches merged to ``dst`` as INT8; returns the ConvertReport.

    Uses of the patcher: ``.model.diffusion_model`` (the module) and ``.patches`` (ComfyUI's per-key patch
    lists), each patched weight computed by ``comfy.lora.calculate_weight`` when the writer reaches it.
    """
    from ..quant.convert import convert_source
    from ..quant.lora_bake import model_tensor_source

    module = patcher.model.diffusion_model
    source = model_tensor_source(module, patched_weight_function(patcher), name=type(module).__name__)
    return convert_source(source, dst, method=method, rotate=rotate, layout=layout, skip=skip, progress=progress)


class HeadroomSaveInt8Model:
    """Save INT8 Model."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..quant.formats import writable_formats

        layouts = writable_formats()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to save, with the LoRAs / patches applied in "
                                               "the graph (they are merged into the weights)."}),
                "filename_prefix": ("STRING", {"default": "headroom/model-int8", "tooltip":
                    "File name prefix (may contain a sub-folder); a counter and .safetensors are added."}),
                "method": (METHODS, {"default": "rowwise", "tooltip":
                    "rowwise: one scale per output channel (fastest, ComfyUI-compatible); block: one scale per "
                    "128 inputs (most accurate); tensorwise: one scale."}),
                "destination": (DESTINATIONS, {"default": "diffusion_models", "tooltip":
                    "diffusion_models: appears in the loaders' lists; output: ComfyUI's output folder."}),
            },
            "optional": {
                "rotate": (ROTATIONS, {"default": "none", "tooltip":
                    "Hadamard-rotate the weights in groups of this many inputs (ComfyUI's convrot): much lower "
                    "INT8 error on layers with outlier channels. 128 is readable by headroom only."}),
                "layout": ([f.name for f in layouts], {"default": "headroom", "tooltip":
                    "; ".join(f"{f.name}: {f.summary}" for f in layouts)}),
                "skip_patterns": ("STRING", {"default": "", "multiline": True, "tooltip":
                    "Extra substrings (comma or newline separated) naming layers to keep in full precision."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("status",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes the model as an INT8 safetensors file with its LoRAs merged, one weight at a time "
                   "(no second copy of the model in RAM). Load it with 'Load Diffusion Model (INT8)'.")

    def save(self, model, filename_prefix, method, destination, rotate="none", layout="headroom", skip_patterns=""):
        group = rotation_group(rotate)
        skip = skip_list(skip_patterns)
        dst = output_path(filename_prefix, destination)
        report = save_int8_model(model, dst, method=method, rotate=group, layout=layout, skip=skip or None)
        status = (f"saved {os.path.basename(dst)} ({destination}): {len(report.quantized)} layers INT8 {method}"
                  f"{f', rotated {group}' if group else ''}, {len(report.kept)} kept in float, "
                  f"{patched_key_count(model)} patched weights merged, {report.bytes_after / 2**30:.2f} GiB, "
                  f"{report.seconds:.1f} s")
        log.info("headroom: %s", status)
        return {"ui": {"text": [status]}, "result": (status,)}


NODE_CLASS_MAPPINGS = {"HeadroomSaveInt8Model": HeadroomSaveInt8Model}
NODE_DISPLAY_NAME_MAPPINGS = {"HeadroomSaveInt8Model": "Save INT8 Model"}
