"""ComfyUI-native road: INT8 loaders for models ComfyUI already supports, and LoRA on them.

Thin nodes: parse inputs, call :mod:`..integrations.comfyui` (load, ops, sampling) / :mod:`..quant.lora`, format a
status line. ComfyUI is imported inside the functions only (the package imports without it).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict

import torch

from ..integrations.comfyui.fused import FUSE_CHOICES, fuse_mode
from ..integrations.comfyui.ops import WEIGHT_FORMATS
from ..integrations.comfyui.sampling import COMPUTE_CHOICES
from .inputs import ROTATIONS, rotation_group, skip_list

log = logging.getLogger("comfyui_headroom")

CATEGORY = "headroom"

TIP_SKIP = ("Extra substrings (comma or newline separated) naming layers to keep in full precision, on top of "
            "the defaults (embeddings, norms, modulation, input/output and final layers). A trailing $ anchors "
            "a pattern at the end of the layer name.")
TIP_MIN_FEATURES = "Linear layers with fewer input or output features than this stay in full precision."


def _ui(status: str, *outputs):
    return {"ui": {"text": [status]}, "result": (*outputs, status)}


def _progress(unique_id):
    import comfy.utils

    bar = comfy.utils.ProgressBar(1, node_id=unique_id)
    return lambda done, total: bar.update_absolute(done, total)


def _tracker():
    from ..memory import MemoryTracker

    return MemoryTracker()


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------

class HeadroomLoadDiffusionModelInt8:
    """Load Diffusion Model (INT8)."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "unet_name": (folder_paths.get_filename_list("diffusion_models"), {
                    "tooltip": "A diffusion model from ComfyUI's diffusion_models folder: INT8 (headroom, ComfyUI "
                               "int8_tensorwise incl. convrot, lightx2v, OneTrainer) or bf16/fp16/fp8."}),
                "weight_format": (list(WEIGHT_FORMATS), {"default": "auto", "tooltip":
                    "Granularity used when quantizing while loading: auto = rowwise (fastest, one scale per "
                    "output channel), block (one scale per 128 inputs, most accurate), tensorwise. INT8 files "
                    "keep the format they were written in."}),
                "quantize_on_load": ("BOOLEAN", {"default": True, "tooltip":
                    "Quantize bf16/fp16/fp8 linear layers to INT8 while loading, one layer at a time (no "
                    "second full copy in RAM). Off: only layers already INT8 in the file are INT8."}),
                "compute": (list(COMPUTE_CHOICES), {"default": "auto", "tooltip":
                    "INT8 kernel during sampling: auto picks per GPU and shape; triton = W8A8 Triton; int_mm = "
                    "cuBLAS INT8 (torch._int_mm); w8a16 = weight-only; reference = dequantize + matmul."}),
                "skip_patterns": ("STRING", {"default": "", "multiline": True, "tooltip": TIP_SKIP}),
                "gpu_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                    "0 = ComfyUI's memory manager decides what stays on the GPU. > 0 = at most this many GB of "
                    "weights on the GPU; the rest streams from RAM each step (ComfyUI partial loading)."}),
                "blocks_resident": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                    "0 = ComfyUI's memory manager. > 0 = headroom block streaming: keep this many transformer "
                    "blocks on the GPU and stream the others from pinned RAM on a side stream."}),
            },
            "optional": {
                "min_features": ("INT", {"default": 1024, "min": 1, "max": 65536, "advanced": True,
                                         "tooltip": TIP_MIN_FEATURES}),
                "rotate": (ROTATIONS, {"default": "none", "advanced": True, "tooltip":
                    "Hadamard rotation (QuaRot) for the layers quantized while loading: weights are stored as "
                    "INT8 of W*H in groups of this many inputs and activations are rotated on the fly. Lower "
                    "INT8 error on layers with outlier channels; costs a little speed. Layers already INT8 in "
                    "the file keep their own format."}),
                "quantize_modulation": ("BOOLEAN", {"default": False, "advanced": True, "tooltip":
                    "Also quantize the per-block modulation projections (img_mod, txt_mod, modulation, adaLN), "
                    "which stay in full precision by default. Saves VRAM where they are large (about 13 GB "
                    "bf16 in Qwen-Image) at some quality risk: they scale and shift every token."}),
                "devices": ("STRING", {"default": "", "advanced": True, "tooltip":
                    "Split the model's blocks over several GPUs, e.g. 'cuda:0,cuda:1' (empty = one GPU, as "
                    "ComfyUI decides). Activations move between the GPUs at the block boundary; the output "
                    "returns to ComfyUI's device. Not with gpu_budget_gb or blocks_resident."}),
                "gpu_budgets_gb": ("STRING", {"default": "", "advanced": True, "tooltip":
                    "With devices: GB of weights per device, e.g. '40,40' (one number = the same on each). "
                    "Blocks fill the devices in order; blocks that fit on no device stream from pinned RAM onto "
                    "the last one. Empty = split evenly by bytes."}),
                "ram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5, "advanced": True,
                                            "tooltip":
                    "With blocks_resident: at most this many GB of RAM for the streamed blocks; the others are "
                    "read from the SSD on every step (the disk tier; 'headroom doctor' says what fits). A "
                    "bf16/fp16/fp8 file is converted once into the INT8 cache ($HEADROOM_CACHE/int8) first. "
                    "0 = no RAM limit."}),
                "fuse_blocks": (list(FUSE_CHOICES), {"default": "auto", "advanced": True, "tooltip":
                    "Fused INT8 blocks: norm + modulation, attention output and MLP activation write the next "
                    "layer's input in INT8 (Flux, Flux 2, HunyuanImage 2.1, ...). auto = where a W8A8 kernel "
                    "runs (or as HEADROOM_FUSE_BLOCKS says); on = always (CPU too); off = ComfyUI's own block "
                    "code. Patches, LoRAs and per-token modulation run ComfyUI's code for that call."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "status")
    OUTPUT_TOOLTIPS = ("A normal ComfyUI MODEL with INT8 linear layers (KSampler, LoRA loaders and ComfyUI's memory "
                       "manager accept it).", "What was loaded, how, and peak RAM/VRAM while loading.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a diffusion model through ComfyUI's own loader with INT8 linear layers. Norms, embeddings, "
                   "modulation and final layers stay in full precision.")

    def load(self, unet_name, weight_format, quantize_on_load, compute, skip_patterns, gpu_budget_gb,
             blocks_resident, min_features=1024, rotate="none", quantize_modulation=False, devices="",
             gpu_budgets_gb="", ram_budget_gb=0.0, fuse_blocks="auto", unique_id=None):
        import folder_paths
        import torch

        from ..integrations.comfyui.load import budget_from_gb, load_int8_diffusion_model
        from ..integrations.comfyui.ops import Int8LoadConfig, native_skip_patterns
        from ..integrations.comfyui.sampling import install_sampling_wrapper
        from ..memory.budgets import parse_device_budgets, parse_devices
        from ..memory.doctor import oom_advice

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        config = Int8LoadConfig(weight_format=weight_format, quantize_on_load=bool(quantize_on_load),
                                skip_patterns=skip_list(skip_patterns), min_features=int(min_features),
                                rotation_group=rotation_group(rotate), compute=compute,
                                default_skips=native_skip_patterns(bool(quantize_modulation)),
                                fuse_blocks=fuse_blocks)
        split_over = parse_devices(devices, torch.cuda.device_count())
        device_budgets = parse_device_budgets(gpu_budgets_gb, split_over) if split_over else None
        with _tracker() as tracker:
            patcher, record = load_int8_diffusion_model(path, config, budget_from_gb(gpu_budget_gb),
                                                        progress=_progress(unique_id),
                                                        blocks_resident=int(blocks_resident), devices=split_over,
                                                        device_budgets=device_budgets or (),
                                                        ram_budget_bytes=budget_from_gb(ram_budget_gb))
        install_sampling_wrapper(patcher, compute, oom_advice=functools.partial(
            oom_advice, path, budget_from_gb(gpu_budget_gb) or None, budget_from_gb(ram_budget_gb) or None))
        placement = "ComfyUI memory manager"
        if gpu_budget_gb > 0:
            placement = f"GPU weight budget {gpu_budget_gb:g} GB (rest streamed by ComfyUI partial loading)"
        if blocks_resident > 0:
            placement = f"block streaming, {blocks_resident} blocks resident"
        if record.disk_file:
            placement += (f", RAM budget {ram_budget_gb:g} GB: blocks beyond it streamed from "
                          f"{os.path.basename(record.disk_file)}"
                          + (" (converted into the INT8 cache now)" if record.disk_cache_written else ""))
        if split_over:
            placement = f"blocks split over {', '.join(split_over)}" + (
                f" (budgets {gpu_budgets_gb} GB)" if device_budgets else " (evenly by bytes)")
        fused = f"fused blocks {record.fused_blocks} ({fuse_mode(fuse_blocks)})" if record.fused_blocks else \
            "no fused blocks for this architecture"
        status = (f"{unet_name}: {record.summary()}; compute {compute}; {fused}; {placement}; "
                  f"load {tracker.report}")
        if record.int8_layers == 0:
            status += " | WARNING: no layer is INT8 (quantize_on_load off, or every layer skipped)"
        log.info("headroom: %s", status)
        return _ui(status, patcher)


class HeadroomLoadClipInt8:
    """Load CLIP (INT8)."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        import nodes

        base = nodes.CLIPLoader.INPUT_TYPES()
        clip_type = base["required"]["type"]
        return {
            "required": {
                "clip_name": (folder_paths.get_filename_list("text_encoders"), {
                    "tooltip": "A text encoder from ComfyUI's text_encoders folder (float, fp8 or INT8)."}),
                "type": (clip_type[0], {"tooltip": "The model family the text encoder is for (as in CLIPLoader)."}),
                "weight_format": (list(WEIGHT_FORMATS), {"default": "auto", "tooltip":
                    "Granularity for layers quantized while loading (auto = rowwise)."}),
                "skip_patterns": ("STRING", {"default": "", "multiline": True, "tooltip": TIP_SKIP}),
            },
            "optional": {
                "device": (["default", "cpu"], {"advanced": True, "tooltip": "cpu: run the text encoder on the CPU."}),
                "min_features": ("INT", {"default": 1024, "min": 1, "max": 65536, "advanced": True,
                                         "tooltip": TIP_MIN_FEATURES}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("CLIP", "STRING")
    RETURN_NAMES = ("clip", "status")
    OUTPUT_TOOLTIPS = ("A normal ComfyUI CLIP whose linear layers are INT8.", "What was loaded and how.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a text encoder like CLIPLoader, with INT8 linear layers; embeddings and norms stay float."

    def load(self, clip_name, type, weight_format, skip_patterns, device="default", min_features=1024,
             unique_id=None):
        import comfy.sd
        import folder_paths

        from ..integrations.comfyui.load import load_int8_text_encoder
        from ..integrations.comfyui.ops import TEXT_ENCODER_SKIP_PATTERNS, Int8LoadConfig

        clip_type = getattr(comfy.sd.CLIPType, type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
        options = {}
        if device == "cpu":
            options["load_device"] = options["offload_device"] = torch.device("cpu")
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        config = Int8LoadConfig(weight_format=weight_format, skip_patterns=skip_list(skip_patterns),
                                default_skips=TEXT_ENCODER_SKIP_PATTERNS, min_features=int(min_features))
        with _tracker() as tracker:
            clip, record = load_int8_text_encoder([path], clip_type, config, options,
                                                  folder_paths.get_folder_paths("embeddings"),
                                                  progress=_progress(unique_id))
        status = f"{clip_name}: {record.summary()}; load {tracker.report}"
        log.info("headroom: %s", status)
        return _ui(status, clip)


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------

class _LoraFileCache:
    """A few LoRA files, read and INT8-dequantized once (keyed by path, size and mtime)."""

    def __init__(self, entries: int = 4) -> None:
        self.entries = entries
        self._files: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str):
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        import comfy.utils

        from ..quant.lora import dequantize_int8_lora

        tensors, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        tensors, int8_count = dequantize_int8_lora(tensors, metadata)
        value = (tensors, metadata, int8_count)
        with self._lock:
            self._files[key] = value
            while len(self._files) > self.entries:
                self._files.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._files.clear()


LORA_FILES = _LoraFileCache(int(os.environ.get("HEADROOM_LORA_FILE_CACHE", "4")))


def _register_caches() -> None:
    from ..memory import register_cache
    from ..quant.lora import PREPARED

    register_cache(LORA_FILES.clear, "headroom LoRA files")
    register_cache(PREPARED.clear, "headroom prepared LoRA tensors")


def _weight_shapes(*modules) -> dict:
    shapes = {}
    for module in modules:
        if module is not None:
            shapes.update({k: tuple(v.shape) for k, v in module.state_dict().items()})
    return shapes


def apply_lora(model, clip, lora_name: str, strength_model: float, strength_clip: float, offload_to_cpu: bool):
    """``(model, clip, status)`` with the LoRA's patches on clones; raises before touching anything on a misfit."""
    import comfy.lora
    import comfy.lora_convert
    import folder_paths

    from ..quant.linear import int8_layers
    from ..quant.lora import LoraShapeError, patch_shape_problems

    _register_caches()
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    tensors, metadata, int8_count = LORA_FILES.get(path)
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(tensors)), key_map, log_missing=False)
    if not loaded:
        raise LoraShapeError(f"LoRA Loader (INT8): no key of {lora_name} matches this model; is it a LoRA for a "
                             f"different model family?")
    shapes = _weight_shapes(model.model if model is not None else None,
                            clip.cond_stage_model if clip is not None else None)
    problems = patch_shape_problems(loaded, shapes)
    if problems:
        raise LoraShapeError(f"LoRA Loader (INT8): {lora_name} does not fit this model ({len(problems)} layers); "
                             f"the model was not changed:\n  " + "\n  ".join(problems[:20])
                             + ("\n  ..." if len(problems) > 20 else ""))
    parts = []
    new_model, new_clip = model, clip
    if model is not None and strength_model != 0:
        new_model = model.clone()
        keys = new_model.add_patches(loaded, strength_model)
        if hasattr(new_model, "headroom_lora_offload"):
            new_model.headroom_lora_offload = bool(offload_to_cpu)
        int8_keys = {f"{n}.weight" for n, _ in int8_layers(model.model)}
        on_int8 = sum(1 for k in keys if (k if isinstance(k, str) else k[0]) in int8_keys)
        parts.append(f"model: {len(keys)} weights ({on_int8} INT8 side branches) at {strength_model:g}")
    if clip is not None and strength_clip != 0:
        new_clip = clip.clone()
        keys = new_clip.add_patches(loaded, strength_clip)
        if hasattr(new_clip.patcher, "headroom_lora_offload"):
            new_clip.patcher.headroom_lora_offload = bool(offload_to_cpu)
        parts.append(f"clip: {len(keys)} weights at {strength_clip:g}")
    extra = f"; {int8_count} INT8 LoRA tensors dequantized" if int8_count else ""
    offload = "; LoRA tensors kept on CPU" if offload_to_cpu else ""
    status = f"{lora_name}: " + ("; ".join(parts) or "strength 0, nothing applied") + extra + offload
    return new_model, new_clip, status


TIP_STRENGTH = "How strongly the LoRA changes the model (negative values invert it). Changing it needs no reload."
TIP_OFFLOAD = "Keep the LoRA tensors in RAM and copy them to the GPU per layer (saves VRAM, a little slower)."


class HeadroomLoraLoaderInt8:
    """LoRA Loader (INT8)."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "model": ("MODEL", {"tooltip": "A model (INT8 from Load Diffusion Model (INT8), or float)."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A float or INT8-quantized LoRA "
                          "(kohya, diffusers or ComfyUI key styles)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01, "tooltip": TIP_STRENGTH}),
            "offload_to_cpu": ("BOOLEAN", {"default": False, "tooltip": TIP_OFFLOAD}),
        }}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "status")
    OUTPUT_TOOLTIPS = ("The model with the LoRA attached (INT8 layers: float side branches).", "What was applied.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a LoRA to a model; on INT8 layers as a float side branch, never re-quantizing. Stackable."

    def load(self, model, lora_name, strength, offload_to_cpu):
        new_model, _, status = apply_lora(model, None, lora_name, strength, 0.0, offload_to_cpu)
        return _ui(status, new_model)


class HeadroomLoraLoaderInt8WithClip:
    """LoRA Loader (INT8, with CLIP)."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "model": ("MODEL", {"tooltip": "A model (INT8 or float)."}),
            "clip": ("CLIP", {"tooltip": "A text encoder (INT8 from Load CLIP (INT8), or float)."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A float or INT8-quantized LoRA."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01, "tooltip": TIP_STRENGTH}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.01, "tooltip": TIP_STRENGTH}),
            "offload_to_cpu": ("BOOLEAN", {"default": False, "tooltip": TIP_OFFLOAD}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "status")
    OUTPUT_TOOLTIPS = ("The model with the LoRA attached.", "The text encoder with the LoRA attached.",
                       "What was applied.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a LoRA to a model and its text encoder; INT8 layers get float side branches. Stackable."

    def load(self, model, clip, lora_name, strength_model, strength_clip, offload_to_cpu):
        new_model, new_clip, status = apply_lora(model, clip, lora_name, strength_model, strength_clip, offload_to_cpu)
        return _ui(status, new_model, new_clip)


NODE_CLASS_MAPPINGS: dict = {
    "HeadroomLoadDiffusionModelInt8": HeadroomLoadDiffusionModelInt8,
    "HeadroomLoadClipInt8": HeadroomLoadClipInt8,
    "HeadroomLoraLoaderInt8": HeadroomLoraLoaderInt8,
    "HeadroomLoraLoaderInt8WithClip": HeadroomLoraLoaderInt8WithClip,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "HeadroomLoadDiffusionModelInt8": "Load Diffusion Model (INT8)",
    "HeadroomLoadClipInt8": "Load CLIP (INT8)",
    "HeadroomLoraLoaderInt8": "LoRA Loader (INT8)",
    "HeadroomLoraLoaderInt8WithClip": "LoRA Loader (INT8, with CLIP)",
}
