"""``Int8ModelPatcher``: ComfyUI's model patcher, aware of headroom's INT8 layers.

A subclass of ComfyUI's classic (non-dynamic) ``ModelPatcher`` - as ComfyUI-GGUF does - that keeps all of
ComfyUI's patch bookkeeping (LoRA patches, clones, partial loading) and changes only what INT8 weights need:
LoRA patches become float side branches instead of merges, a VRAM budget caps the weights ComfyUI puts on the
GPU, ``blocks_resident`` hands placement to headroom's block streaming, and ``devices`` splits the blocks over
several GPUs (memory/multi_device.py). Built on first use (it subclasses a ComfyUI class; this package imports
without ComfyUI).
"""

from __future__ import annotations

import functools
import logging

import torch

from ...kernels.int8 import FP8_DTYPES
from ...memory import disable_block_streaming, disable_multi_device, enable_block_streaming, enable_multi_device, \
    split_of, streamer_of
from ...memory.planner import plan_placement
from ...quant.linear import int8_layers
from ...quant.lora import LoraShapeError, UnsupportedPatchError, fits, low_rank_of, side_branches

log = logging.getLogger("comfyui_headroom")


def int8_modules(model) -> dict:
    """``{"<layer>.weight": layer}`` for the INT8 layers of ``model``: the keys ComfyUI's patches use."""
    return {f"{n}.weight": m for n, m in int8_layers(model)}


def patch_problems(modules: dict, patches: dict, strength_patch: float, strength_model: float) -> list[str]:
    """Why each patch in ``patches`` (ComfyUI's ``add_patches`` input) that lands on an INT8 layer cannot become a
    side branch there (empty when all can): a patch type other than LoRA/LoCon, or a shape that does not fit."""
    problems = []
    for k, value in patches.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        module = modules.get(key)
        if module is None:
            continue
        try:
            low = low_rank_of((strength_patch, value, strength_model, offset, function), key)
            problem = fits(low, module.out_features, module.in_features)
            if problem:
                problems.append(f"{key}: {problem}")
        except (UnsupportedPatchError, LoraShapeError) as err:
            problems.append(str(err))
    return problems


def attach_side_branches(modules: dict, patches: dict, device, dtype: torch.dtype) -> None:
    """Give every INT8 layer the float side branches of its patches (none: no branches); refuses, naming the
    layers, patches that cannot be side branches."""
    problems = []
    for key, module in modules.items():
        layer_patches = patches.get(key)
        if not layer_patches:
            module.lora = []
            continue
        try:
            module.lora = side_branches(layer_patches, key, module.out_features, module.in_features, device, dtype)
        except (UnsupportedPatchError, LoraShapeError) as err:
            module.lora = []
            problems.append(str(err))
        module._headroom_patches = patches
    if problems:
        raise UnsupportedPatchError(
            "Load Diffusion Model (INT8): patches on INT8 layers that cannot be applied as side branches: "
            + "; ".join(problems[:8]))


def drop_lowvram_patches(modules: dict) -> None:
    """Remove the ``LowVramPatch`` (merge on the fly) that ComfyUI attaches to patched weights it leaves on the
    CPU: for INT8 weights the side branches already carry those patches."""
    for key, module in modules.items():
        if module.weight_function:
            module.weight_function = [f for f in module.weight_function
                                      if not (getattr(f, "is_lowvram_patch", False) and f.key == key)]


def branch_bytes_off_cpu(modules: dict) -> int:
    """Bytes of the layers' side branches held outside the CPU (on the GPU)."""
    return sum(t.numel() * t.element_size() for module in modules.values() for down, up, _ in module.lora
               for t in (down, up) if t.device.type != "cpu")


def park_branches_of_offloaded_layers(modules: dict, patches: dict, dtype: torch.dtype) -> int:
    """After ComfyUI moved some INT8 weights back to the CPU (a partial unload), their side branches follow:
    rebuilt as CPU copies (``apply_side_branches`` moves them to the input per call, as it does for
    ``lora_offload``). Returns the branch bytes that left the GPU."""
    offloaded = {key: module for key, module in modules.items()
                 if module.lora and module.weight.device.type == "cpu"}
    before = branch_bytes_off_cpu(offloaded)
    if before:
        attach_side_branches(offloaded, patches, None, dtype)
    return before


def inference_lora_dtype(model) -> torch.dtype:
    """The dtype LoRA side branches compute in: the model's inference dtype where it is a float one ComfyUI
    computes in (not fp8), else float32."""
    getter = getattr(model, "get_dtype_inference", None)
    dtype = getter() if getter is not None else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype not in FP8_DTYPES \
        else torch.float32


@functools.lru_cache(maxsize=None)
def patcher_class():
    """``Int8ModelPatcher``: ComfyUI's (non-dynamic) ModelPatcher, INT8-aware (built on first use)."""
    import comfy.model_patcher as mp

    class Int8ModelPatcher(mp.ModelPatcher):
        """Keeps ComfyUI's patch bookkeeping; INT8 weights get their LoRA patches as side branches.

        * ``add_patches`` refuses, before anything is attached, patches an INT8 layer cannot honour;
        * ``load`` builds the branches (and caps the VRAM used for weights at ``headroom_budget_bytes``,
          leaving the rest to ComfyUI's partial loading);
        * ``patch_weight_to_device`` never merges into an INT8 weight; ``unpatch_model`` drops branches.
        """

        headroom_budget_bytes = 0
        headroom_lora_offload = False
        headroom_blocks_resident = 0  # > 0: headroom block streaming instead of ComfyUI's partial loading
        headroom_devices: tuple = ()  # >= 2 devices: the blocks split over them instead of one load device
        headroom_device_budgets: tuple = ()  # bytes per device for that split; () = split evenly by bytes
        headroom_ram_budget_bytes = 0  # > 0 (with blocks_resident): streamed blocks beyond it are read from disk
        headroom_disk = None  # the SafetensorsSource those blocks are read from (integrations/comfyui/disk_tier.py)

        def clone(self, *args, **kwargs):
            n = super().clone(*args, **kwargs)
            if isinstance(n, Int8ModelPatcher):
                n.headroom_budget_bytes = self.headroom_budget_bytes
                n.headroom_lora_offload = self.headroom_lora_offload
                n.headroom_blocks_resident = self.headroom_blocks_resident
                n.headroom_devices = self.headroom_devices
                n.headroom_device_budgets = self.headroom_device_budgets
                n.headroom_ram_budget_bytes = self.headroom_ram_budget_bytes
                n.headroom_disk = self.headroom_disk
            return n

        def _int8_modules(self) -> dict:
            return int8_modules(self.model)

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            problems = patch_problems(self._int8_modules(), patches, strength_patch, strength_model)
            if problems:
                raise UnsupportedPatchError(
                    "Load Diffusion Model (INT8) / Load CLIP (INT8): this patch cannot be applied to INT8 layers "
                    f"({len(problems)} layers): " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
                    + ". INT8 layers accept LoRA/LoCon (no DoRA, LoHa, LoKr or full-weight diffs); to merge "
                    "other patch types load the model in float (UNETLoader / CLIPLoader).")
            return super().add_patches(patches, strength_patch, strength_model)

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                                   force_cast=False):
            module = self._int8_modules().get(key)
            if module is None:
                return super().patch_weight_to_device(key, device_to, inplace_update, return_weight, force_cast)
            if not return_weight:
                return None  # side branches carry the patches (attached in load)
            weight = module.dequantized_weight(torch.float32)
            if device_to is not None:
                weight = weight.to(device_to)
            if key in self.patches:
                import comfy.lora

                weight = comfy.lora.calculate_weight(self.patches[key], weight, key)
            return weight

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            on_gpu = device_to is not None and torch.device(device_to).type != "cpu"
            disk_tier = device_to is not None and self.headroom_ram_budget_bytes > 0  # on a CPU too: disk blocks
            if (on_gpu or disk_tier) and self.headroom_blocks_resident:           # have no data outside the streamer
                room = None if full_load or lowvram_model_memory <= 0 else int(lowvram_model_memory)
                return self.load_streaming(torch.device(device_to), room)
            if on_gpu and self.headroom_devices:
                return self.load_split(torch.device(device_to))
            budget = self.headroom_budget_bytes
            if budget and on_gpu:
                if full_load or lowvram_model_memory <= 0 or lowvram_model_memory > budget:
                    lowvram_model_memory, full_load = budget, False
            super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                         force_patch_weights=force_patch_weights, full_load=full_load)
            self._attach_side_branches(device_to, follow_weights=True)

        def load_streaming(self, device_to: torch.device, weight_bytes: int | None = None) -> None:
            """Keep ``headroom_blocks_resident`` blocks on ``device_to``, stream the rest from pinned RAM - and,
            with a RAM budget, those beyond it from the INT8 file (memory/streaming.py, the disk tier);
            everything outside the blocks goes to ``device_to``. On a model that :meth:`partially_unload` shrank,
            the blocks it streamed come back while its weights stay within ``weight_bytes`` (None: all)."""
            def place(dm) -> int:
                streamer = streamer_of(dm)
                if streamer is None:
                    disk = {"ram_budget_bytes": self.headroom_ram_budget_bytes, "disk": self.headroom_disk} \
                        if self.headroom_ram_budget_bytes else {}
                    streamer = enable_block_streaming(dm, device_to, blocks_resident=self.headroom_blocks_resident,
                                                      **disk)
                elif streamer.demoted:
                    room = None if weight_bytes is None else weight_bytes - self._streamed_weight_bytes(streamer)
                    streamer.grow(room)
                log.info("headroom: %s", streamer.summary())
                return self._streamed_weight_bytes(streamer)

            self._load_placed(device_to, place)
            # still shrunk: ComfyUI's partially_load calls load() again when memory is there (classic patcher)
            self.model.model_lowvram = bool(streamer_of(self.model.diffusion_model).demoted)

        def _streamed_weight_bytes(self, streamer) -> int:
            """The weight bytes a streaming model holds on its device, as ComfyUI should count them."""
            return max(0, self.model_size() - streamer.streamed_bytes + streamer.ring_bytes)

        def load_split(self, device_to: torch.device) -> None:
            """Split the diffusion model's blocks over ``headroom_devices`` (memory/multi_device.py: per-device
            budgets through the planner, or evenly by bytes); the modules before the blocks go with the first
            block, those after with the last; inputs follow each block and the output returns to the first
            device. ComfyUI's accounting sees the model as loaded on ``device_to`` (its load device)."""
            def place(dm) -> int:
                if split_of(dm) is None:
                    target = list(self.headroom_devices)
                    if self.headroom_device_budgets:
                        target = plan_placement(dm, list(self.headroom_device_budgets), devices=target)
                    split = enable_multi_device(dm, target, output_device=device_to)
                    log.info("headroom: %s", split.summary())
                return self.model_size()

            self._load_placed(device_to, place)

        def _load_placed(self, device_to: torch.device, place) -> None:
            """Headroom places the diffusion model itself (``place(diffusion_model)`` -> the weight bytes ComfyUI
            should count as loaded); ComfyUI's bookkeeping then says: loaded on ``device_to``, not low-VRAM."""
            with self.use_ejected():
                for key in self.patches:  # float weights: ComfyUI's merge (INT8 ones: side branches)
                    self.patch_weight_to_device(key)
                self.model.model_loaded_weight_memory = place(self.model.diffusion_model)
                self.model.device = device_to
                self.model.model_lowvram = False
                self.model.current_weight_patches_uuid = self.patches_uuid
                self._attach_side_branches(device_to)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            if self._split():
                return 0  # all or nothing: ComfyUI then unloads the model (unpatch_model)
            if self._streaming():
                return self._shrink_streaming(memory_to_free)
            freed = super().partially_unload(device_to, memory_to_free, force_patch_weights)
            self._drop_own_lowvram_patches()
            # not in model_loaded_weight_memory: counting branches there would make ComfyUI's "offloaded" bytes
            # (model_size - loaded_size) negative for a fully loaded model with a LoRA
            parked = park_branches_of_offloaded_layers(self._int8_modules(), self.patches,
                                                       inference_lora_dtype(self.model))
            if freed + parked:
                # hand the freed blocks back to the driver: under DynamicVRAM the next model's weights are
                # allocated outside torch's caching allocator and cannot reuse its cached blocks
                import comfy.model_management

                comfy.model_management.soft_empty_cache()
            return freed + parked

        def _shrink_streaming(self, memory_to_free) -> int:
            """Partial unload of a streaming model: more of its blocks stream - from pinned RAM, or with the disk
            tier from the model's file once its RAM budget is used (memory/streaming.py ``shrink``) - instead of
            ComfyUI unloading it whole and loading it again on the next prompt. All or nothing, as ComfyUI expects:
            0 when not enough can be freed that way (CUDA graphs, too few resident blocks, no room in the RAM
            budget); then ComfyUI unloads the model."""
            if memory_to_free <= 0:
                return 0
            streamer = streamer_of(self.model.diffusion_model)
            host_room = self.headroom_ram_budget_bytes - streamer.host_bytes if self.headroom_ram_budget_bytes \
                else None  # a RAM budget holds for the blocks it streams too
            freed = streamer.shrink(int(min(memory_to_free, self.model_size() + 1)), host_room)
            if freed:
                self.model.model_loaded_weight_memory = self._streamed_weight_bytes(streamer)
                self.model.model_lowvram = True  # ComfyUI's partially_load then asks load() to grow it back
                log.info("headroom: partial unload freed %.2f GB by streaming more blocks (%d in all): %s",
                         freed / 2**30, len(streamer.demoted), streamer.summary())
                import comfy.model_management

                comfy.model_management.soft_empty_cache()
            return freed

        def _streaming(self) -> bool:
            dm = getattr(self.model, "diffusion_model", None)
            return dm is not None and streamer_of(dm) is not None

        def _split(self) -> bool:
            dm = getattr(self.model, "diffusion_model", None)
            return dm is not None and split_of(dm) is not None

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for module in self._int8_modules().values():
                    module.lora = []
                    module._headroom_patches = None
                if self.headroom_ram_budget_bytes:
                    return self._unpatch_disk_tier(device_to or self.offload_device)
                if self._streaming():
                    disable_block_streaming(self.model.diffusion_model, device=device_to or self.offload_device)
                if self._split():
                    disable_multi_device(self.model.diffusion_model, device=device_to or self.offload_device)
            return super().unpatch_model(device_to, unpatch_weights)

        def _unpatch_disk_tier(self, device_to) -> None:
            """Unload a model whose disk-tier blocks own no data (meta) until the next load streams them from the
            file again: everything else moves to ``device_to`` here, since ComfyUI's ``model.to(device)`` cannot
            move a meta tensor. Safe to call again on an unloaded model."""
            streamer = streamer_of(self.model.diffusion_model)
            if streamer is not None:
                streamer.disable(device=device_to, load_disk_blocks=False)
            self.model._apply(lambda t: t if t.is_meta else t.to(device_to))
            super().unpatch_model(None, True)
            self.model.device = device_to

        def _attach_side_branches(self, device_to, follow_weights: bool = False) -> None:
            """Branches on ``device_to`` (CPU copies with ``lora_offload``); ``follow_weights``: a layer whose weight
            ComfyUI's partial loading left on the CPU gets CPU copies too, built once where they stay."""
            modules = self._int8_modules()
            drop_lowvram_patches(modules)
            dtype = inference_lora_dtype(self.model)
            if follow_weights:
                on_cpu = {key: m for key, m in modules.items() if m.weight.device.type == "cpu"}
                attach_side_branches(on_cpu, self.patches, None, dtype)
                modules = {key: m for key, m in modules.items() if key not in on_cpu}
            device = None if self.headroom_lora_offload else device_to
            attach_side_branches(modules, self.patches, device, dtype)

        def _drop_own_lowvram_patches(self) -> None:
            drop_lowvram_patches(self._int8_modules())

    return Int8ModelPatcher


def adopt_patcher(patcher, budget_bytes: int = 0, reinit: tuple | None = None, blocks_resident: int = 0,
                  devices=(), device_budgets=(), ram_budget_bytes: int = 0, disk=None):
    """A clone of ``patcher`` (same model) as an ``Int8ModelPatcher``."""
    cls = patcher_class()
    n = patcher.clone()
    if not isinstance(n, cls):
        n.__class__ = cls
    n.headroom_budget_bytes = int(budget_bytes)
    n.headroom_blocks_resident = int(blocks_resident)
    n.headroom_devices = tuple(devices)
    n.headroom_device_budgets = tuple(device_budgets or ())
    n.headroom_ram_budget_bytes = int(ram_budget_bytes)
    n.headroom_disk = disk
    if reinit is not None:
        n.cached_patcher_init = reinit
    return n
