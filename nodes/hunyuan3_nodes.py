"""HunyuanImage-3 nodes (category ``headroom/hunyuan3``): budget loaders and generators.

Thin: the loading is ``integrations/hunyuan3/loader.load_hf_model``, the run
``integrations/hunyuan3/generate.generate``. ComfyUI is imported inside functions only. Model folders live under
``models/hunyuan3/`` (registered here as the ``hunyuan3`` folder type); a folder is listed when it has a
config.json.
"""

from __future__ import annotations

import logging
import os
import threading

from ..integrations.hunyuan3.inputs import (
    ATTENTION_IMPLEMENTATIONS,
    DEVICE_MAPS,
    INT8_ENGINES,
    MAX_GB,
    MAX_RAM_GB,
    MAX_GPU_LAYERS,
    OFFLOAD_MODES,
    POST_ACTIONS,
    check_load_numbers,
    check_ram_budget,
)
from .hunyuan3_types import CATEGORY, MODEL_TYPE

log = logging.getLogger("comfyui_headroom")

FOLDER_KEY = "hunyuan3"
TRUST_TOOLTIP = ("HunyuanImage-3 ships its own Python code (modeling files in the model folder); loading it runs "
                 "that code with your user's rights. Turn this on only for folders from a source you trust. "
                 "Local folders only - nothing is downloaded.")
BUDGET_TOOLTIP = ("VRAM for the weights, in GB. 0 = auto: 55 % of the card (the community HunyuanImage-3 loaders' "
                  "rule: 55 % of a 96 GB card leaves ~43 GB for inference). What does not fit goes to RAM. "
                  "Suggested: 24 GB card 18-20, 32 GB 26-28, 96 GB 52. Above the card: clamped to it.")
EXTERNAL_TOOLTIP = "VRAM other programs or models already hold on this card; subtracted from the budget."

# ------------------------------------------------------------------------------ folders


def _folder_paths():
    import folder_paths  # ComfyUI

    if FOLDER_KEY not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, FOLDER_KEY)
        folder_paths.folder_names_and_paths[FOLDER_KEY] = ([path], set())
    return folder_paths


def model_folder_choices() -> list[str]:
    """Sub-folders (any depth up to 2) of every ``hunyuan3`` models dir that hold a config.json."""
    try:
        fp = _folder_paths()
    except ImportError:
        return []
    found = []
    for root in fp.get_folder_paths(FOLDER_KEY):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if "config.json" in filenames and dirpath != root:
                found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []
            elif depth >= 1:
                dirnames[:] = []
    return sorted(set(found)) or ["(put model folders in models/hunyuan3)"]


def resolve_model_folder(name: str) -> str:
    if os.path.isabs(name) and os.path.isdir(name):
        return name
    fp = _folder_paths()
    for root in fp.get_folder_paths(FOLDER_KEY):
        candidate = os.path.join(root, name)
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ValueError(f"model folder {name!r} not found under {fp.get_folder_paths(FOLDER_KEY)} (it needs a config.json)")


# ------------------------------------------------------------------------------ cache


class ModelCache:
    """One loaded model at a time (a second one would not fit next to it), keyed by what shapes the load."""

    def __init__(self):
        self._lock = threading.Lock()
        self.key = None
        self.loaded = None

    def get(self, key, fingerprint: str):
        with self._lock:
            if self.key == key and self.loaded is not None and self.loaded.fingerprint == fingerprint:
                return self.loaded
            return None

    def put(self, key, loaded) -> None:
        with self._lock:
            self.key, self.loaded = key, loaded
        loaded.cache_key = key
        loaded.on_unload = lambda: self.drop(loaded)

    def drop(self, loaded=None) -> bool:
        """Forget the cached model (only if it is ``loaded`` when given); frees its memory once unreferenced."""
        import gc

        with self._lock:
            if self.loaded is None or (loaded is not None and self.loaded is not loaded):
                return False
            dropped, self.key, self.loaded = self.loaded, None, None
        # Force unload: a streaming model's hooks, ring and disk reader thread go first (its disk layers are not
        # read back just to be dropped); the object may still be cached by ComfyUI, which reloads it on its next run.
        try:
            dropped.release()
        except Exception as err:  # noqa: BLE001 - the model is dropped anyway
            log.warning("hunyuan3: releasing the model: %s", err)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        return True


CACHE = ModelCache()


def _register_force_unload_hook() -> None:
    try:
        from ..memory.unload import register_cache

        register_cache(CACHE.drop, "hunyuan3_models")
    except (ImportError, AttributeError):
        pass


_register_force_unload_hook()


def load_cached(folder: str, mode: str, budget_gb: float, external_vram_gb: float, trust_remote_code: bool,
                attn_implementation: str, device_map: str = "auto", gpu_layers: int = 0, gpu_budgets_gb: str = "",
                int8_engine: str = INT8_ENGINES[0], ram_budget_gb: float = 0.0):
    """Load (or reuse) a model; a changed folder (files, sizes, mtimes) reloads."""
    from ..integrations.hunyuan3.loader import folder_fingerprint, load_hf_model

    path = os.path.realpath(folder)
    # Checked before the cached model is dropped: a bad number must not cost the loaded model.
    budget_gb, external_vram_gb, gpu_layers, _ = check_load_numbers(budget_gb, external_vram_gb,
                                                                    gpu_layers if device_map == "manual" else None)
    ram_budget_gb = check_ram_budget(ram_budget_gb)
    key = (path, mode, budget_gb, external_vram_gb, attn_implementation, device_map, gpu_layers,
           (gpu_budgets_gb or "").strip(), int8_engine if mode == "int8" else None, ram_budget_gb)
    fingerprint = folder_fingerprint(path)
    cached = CACHE.get(key, fingerprint)
    if cached is not None:
        log.info("hunyuan3: reusing the loaded model (%s, %s, budget %s GB)", path, mode, budget_gb)
        return cached, True
    CACHE.drop()  # free the previous model before loading the next
    loaded = load_hf_model(path, mode=mode, budget_gb=budget_gb, external_vram_gb=external_vram_gb,
                           trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                           device_map=device_map, gpu_layers=gpu_layers, gpu_budgets_gb=gpu_budgets_gb,
                           int8_engine=int8_engine, ram_budget_gb=ram_budget_gb)
    CACHE.put(key, loaded)
    return loaded, False


# ------------------------------------------------------------------------------ loaders


class _Hunyuan3LoaderBase:
    MODE = "int8"
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "load_report")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        types = {
            "required": {
                "model_folder": (model_folder_choices(), {"tooltip": "A model folder under models/hunyuan3 "
                                                          "(config.json + safetensors + its modeling code)."}),
                "gpu_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_GB, "step": 0.5,
                                            "tooltip": BUDGET_TOOLTIP}),
                "external_vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_GB, "step": 0.5,
                                               "tooltip": EXTERNAL_TOOLTIP}),
                "trust_remote_code": ("BOOLEAN", {"default": False, "tooltip": TRUST_TOOLTIP}),
                "attn_implementation": (list(ATTENTION_IMPLEMENTATIONS), {"default": ATTENTION_IMPLEMENTATIONS[0]}),
            },
            "optional": {
                "device_map": (list(DEVICE_MAPS), {"default": DEVICE_MAPS[0], "tooltip":
                               "auto: placement from the budget. manual: every critical module and the first "
                               "gpu_layers decoder layers on the GPU, the rest in RAM (the community HunyuanImage-3 "
                               "loaders' \"optimal device map\", generated and checked)."}),
                "gpu_layers": ("INT", {"default": 6, "min": 0, "max": MAX_GPU_LAYERS,
                                       "tooltip": "With device_map=manual: decoder layers kept on the GPU."}),
            },
        }
        types["optional"]["gpu_budgets_gb"] = ("STRING", {"default": "", "tooltip":
            "Several GPUs: one budget per GPU in GB, e.g. '40,40' (one number = that on every GPU, 0 = 55 % of "
            "each card). The model is spread over them (INT8/NF4: accelerate's device map; BF16: headroom's split, "
            "layers that fit on no GPU stream from pinned RAM); replaces gpu_budget_gb. Empty = one GPU."})
        if cls.MODE == "int8":
            types["optional"]["int8_engine"] = (list(INT8_ENGINES), {"default": INT8_ENGINES[0], "tooltip":
                "headroom: our W8A8 kernels (attention and every expert in INT8, the 64 experts of a layer in one "
                "grouped GEMM; faster than bf16). bitsandbytes: LLM.int8 (the community loaders' engine, about a "
                "third of bf16's speed). A folder saved by either loads with its own engine."})
            types["optional"]["ram_budget_gb"] = ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_RAM_GB,
                "step": 1.0, "advanced": True, "tooltip":
                "Disk tier (int8_engine headroom, one GPU): host RAM for the decoder layers that do not fit the GPU "
                "budget; the ones beyond it stay on disk and stream from the SSD on every step. 0 = no RAM limit "
                "(nothing on disk). A bf16 folder is quantized once into <folder>.headroom-int8-cache next to it "
                "(or under $HEADROOM_CACHE); a headroom convert folder streams as stored."})
        return types

    @classmethod
    def IS_CHANGED(cls, model_folder, **kwargs):
        from ..integrations.hunyuan3.loader import folder_fingerprint

        try:
            return folder_fingerprint(resolve_model_folder(model_folder))
        except (ValueError, OSError, ImportError):
            return model_folder

    def load(self, model_folder, gpu_budget_gb, external_vram_gb, trust_remote_code, attn_implementation,
             device_map="auto", gpu_layers=6, gpu_budgets_gb="", int8_engine=INT8_ENGINES[0], ram_budget_gb=0.0):
        folder = resolve_model_folder(model_folder)
        loaded, reused = load_cached(folder, self.MODE, gpu_budget_gb, external_vram_gb, trust_remote_code,
                                     attn_implementation, device_map, gpu_layers, gpu_budgets_gb, int8_engine,
                                     ram_budget_gb)
        report = ("(cached) " if reused else "") + loaded.summary()
        return {"ui": {"text": [report]}, "result": (loaded, report)}


class Hunyuan3LoaderInt8Budget(_Hunyuan3LoaderBase):
    """INT8 under a VRAM budget: headroom's W8A8 engine (default) or bitsandbytes LLM.int8 (``int8_engine``)."""

    MODE = "int8"


class Hunyuan3LoaderNF4LowVram(_Hunyuan3LoaderBase):
    """bitsandbytes NF4 (double quant, bf16 compute): the smallest footprint."""

    MODE = "nf4"


class Hunyuan3LoaderBF16Budget(_Hunyuan3LoaderBase):
    """Full precision; decoder layers beyond the budget are streamed from pinned RAM."""

    MODE = "bf16"


# ------------------------------------------------------------------------------ generators


class _Hunyuan3GenerateBase:
    DEFAULT_OFFLOAD = "disabled"
    DEFAULT_POST = "keep"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "status")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "prompt": ("STRING", {"multiline": True, "default": "A brown and white dog running on the grass"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 200}),
                "guidance": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 20.0, "step": 0.1}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16, "tooltip":
                                  "Snapped to the closest of the model's resolution buckets (same aspect ratio)."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16}),
                "offload_mode": (list(OFFLOAD_MODES), {"default": cls.DEFAULT_OFFLOAD, "tooltip":
                                 "smart: offload when < 25 GB free, > 70 % used, or free < the inference estimate "
                                 "(12 GB/MP + 5 GB + reserve). INT8 above 1.2 MP switches 'disabled' to smart."}),
                "post_action": (list(POST_ACTIONS), {"default": cls.DEFAULT_POST, "tooltip":
                                "soft_unload parks the model in pinned RAM; the next run restores it at PCIe speed."}),
            },
            "optional": {
                "budget_override_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_GB, "step": 0.5, "tooltip":
                                       "This run only, without reloading: decoder layers beyond it are streamed "
                                       "(NF4/BF16). 0 = the loader's budget."}),
                "image": ("IMAGE", {"tooltip": "Input image, for models whose code takes one (Instruct)."}),
            },
            # which LoRA nodes feed this generator (the model object is shared: its stack is settled per run)
            "hidden": {"graph_prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def generate(self, model, prompt, seed, steps, guidance, width, height, offload_mode, post_action,
                 budget_override_gb=0.0, image=None, graph_prompt=None, unique_id=None):
        from ..integrations.hunyuan3.generate import GenerateRequest, generate
        from .hunyuan3_lora_node import sync_for_generator

        if model.model is None:  # unloaded by an earlier run while ComfyUI kept the loader's output:
            CACHE.drop()  # free whatever else is cached; generate() reloads this one
        sync_for_generator(model, graph_prompt, unique_id)
        request = GenerateRequest(prompt=prompt, seed=seed, steps=steps, guidance=guidance, width=width,
                                  height=height, offload_mode=offload_mode, budget_override_gb=budget_override_gb,
                                  post_action=post_action, image=_to_pil(image) if image is not None else None)
        result = generate(model, request, on_step=_comfy_step_callback(steps))
        if model.model is not None and CACHE.loaded is not model:
            CACHE.put(model.cache_key, model)
        return {"ui": {"text": [result.status]}, "result": (_to_comfy_image(result.image), result.status)}


class Hunyuan3GenerateLargeBudget(_Hunyuan3GenerateBase):
    """For a model that fits its budget: offload off by default, the model stays loaded."""

    DEFAULT_OFFLOAD = "disabled"
    DEFAULT_POST = "keep"


class Hunyuan3GenerateLowVramBudget(_Hunyuan3GenerateBase):
    """For tight cards: smart offload and soft unload after the run by default."""

    DEFAULT_OFFLOAD = "smart"
    DEFAULT_POST = "soft_unload"


def _comfy_step_callback(total: int):
    """Progress bar over the denoising steps + cancel from the UI (raises inside the step)."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total)

    def on_step(step: int, steps: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, steps)

    return on_step


def _to_comfy_image(pil_image):
    """PIL -> ComfyUI IMAGE: float32 [1, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    array = np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def _to_pil(image):
    """ComfyUI IMAGE [B, H, W, C] -> the first image as PIL."""
    import numpy as np
    from PIL import Image

    array = (image[0].detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., :3])


NODE_CLASS_MAPPINGS: dict = {
    "Hunyuan3LoaderInt8Budget": Hunyuan3LoaderInt8Budget,
    "Hunyuan3LoaderNF4LowVram": Hunyuan3LoaderNF4LowVram,
    "Hunyuan3LoaderBF16Budget": Hunyuan3LoaderBF16Budget,
    "Hunyuan3GenerateLargeBudget": Hunyuan3GenerateLargeBudget,
    "Hunyuan3GenerateLowVramBudget": Hunyuan3GenerateLowVramBudget,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "Hunyuan3LoaderInt8Budget": "Hunyuan 3 Loader (INT8 Budget)",
    "Hunyuan3LoaderNF4LowVram": "Hunyuan 3 Loader (NF4 Low VRAM+)",
    "Hunyuan3LoaderBF16Budget": "Hunyuan 3 Loader (BF16 Budget)",
    "Hunyuan3GenerateLargeBudget": "Hunyuan 3 Generate (Large Budget)",
    "Hunyuan3GenerateLowVramBudget": "Hunyuan 3 Generate (Low VRAM Budget)",
}
