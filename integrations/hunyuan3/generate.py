"""Run ``generate_image`` of a budget-loaded transformers model with the memory rules of the community
HunyuanImage-3 loaders and their performance notes (smart offload, soft unload).

:func:`generate` is what the "Hunyuan 3 Generate" nodes call (no ComfyUI import here):
1. restore the model if it was soft-unloaded;
2. snap width/height to the model's resolution buckets;
3. the smart-offload decision (``memory/estimate.should_offload``; its rule is logged and shown). When it
   says offload, the float modules the denoising loop never calls (vision tower, aligner; ``lm_head`` when
   the size is given) wait in RAM during the run. A per-run budget lower than what the decoder layers take
   on the GPU streams the surplus layers from pinned RAM for this run only (NF4/BF16);
4. the run inside a :class:`MemoryTracker`, with a per-step callback (progress bar, cancel) hooked on
   ``final_layer`` - the module every denoising step calls once, in Tencent's code and in ours;
5. an OOM is caught: what the run held is freed, VRAM is checked against where it was before the run, and
   a :class:`GenerationOOM` says what to change;
6. ``post_action``: keep, soft_unload (pinned RAM, restored at PCIe speed next run) or unload.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...memory.unload import clear_exception_refs, restore, soft_unload
from ...quant.bnb_layers import is_bnb_quantized
from ...units import GB
from .bnb import cast_notice_once
from .inputs import OFFLOAD_MODES, POST_ACTIONS, check_choice, check_gb
from .placement import IDLE_MODULES

log = logging.getLogger("comfyui_headroom")

VRAM_TOLERANCE = 0.02  # after an OOM, VRAM must be back within 2 % of where it was


class GenerationOOM(RuntimeError):
    """Out of GPU memory during a run; the message says what to change. VRAM was given back."""


@dataclass
class GenerateRequest:
    prompt: str
    seed: int = 0
    steps: int = 50
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    offload_mode: str = "smart"
    budget_override_gb: float = 0.0  # 0 = the loader's budget
    post_action: str = "keep"
    image: Any = None  # PIL image(s) for models whose generate_image takes input images (Instruct)


@dataclass
class GenerateResult:
    image: Any
    status: str
    width: int
    height: int
    decision: Any = None
    memory: Any = None
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ sizes


def resolution_buckets(model: nn.Module) -> list[tuple[int, int]]:
    """(width, height) pairs the model generates, from its ``image_processor.reso_group`` when it has one."""
    group = getattr(getattr(model, "image_processor", None), "reso_group", None)
    if group is None:
        return []
    out = []
    for i in range(len(group)):
        r = group[i]
        out.append((int(getattr(r, "width", getattr(r, "w", 0))), int(getattr(r, "height", getattr(r, "h", 0)))))
    return out


def snap_size(model: nn.Module, width: int, height: int) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (the model snaps anyway; we report the real size)."""
    group = getattr(getattr(model, "image_processor", None), "reso_group", None)
    if group is not None and hasattr(group, "get_target_size"):
        w, h = group.get_target_size(width, height)
        return int(w), int(h)
    return max(16, width // 16 * 16), max(16, height // 16 * 16)


# ------------------------------------------------------------------------------------ helpers


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def takes_input_image(model: nn.Module) -> str | None:
    """The name of ``generate_image``'s input-image parameter (Instruct variants), or None."""
    params = inspect.signature(model.generate_image).parameters
    for name in ("image", "images", "cond_image", "input_image"):
        if name in params:
            return name
    return None


class StepHook:
    """Counts denoising steps through a forward hook; calls ``on_step(i, total)`` (which may raise to cancel)."""

    def __init__(self, model: nn.Module, total: int, on_step: Callable[[int, int], None] | None):
        self.count = 0
        self.total = total
        self.on_step = on_step
        target = getattr(model, "final_layer", None)
        self.handle = target.register_forward_hook(self._hook) if isinstance(target, nn.Module) else None

    def _hook(self, module, args, output):
        self.count += 1
        if self.on_step is not None:
            self.on_step(min(self.count, self.total), self.total)

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def vram_allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def park_idle_modules(model: nn.Module, names, device: torch.device) -> list[str]:
    """Move float modules that this run does not call to the CPU; returns what moved."""
    moved = []
    if device.type != "cuda":
        return moved
    for name in names:
        module = getattr(model, name, None)
        if not isinstance(module, nn.Module) or any(is_bnb_quantized(m) for m in module.modules()):
            continue
        if next(module.parameters(), torch.empty(0)).device.type == "cuda":
            module.to("cpu")
            moved.append(name)
    return moved


def unpark_modules(model: nn.Module, names, device: torch.device) -> None:
    for name in names:
        getattr(model, name).to(device)


# ------------------------------------------------------------------------------------ soft unload


def soft_unload_model(loaded) -> str:
    """Park the model in pinned RAM (memory/unload.soft_unload: flat pinned chunks; bitsandbytes LLM.int8
    scales and weight aliases travel with them); the next run restores it at PCIe speed."""
    model = loaded.model
    device = model_device(model)
    tiers = loaded.tiers_text() if hasattr(loaded, "tiers_text") else ""
    if tiers:  # the disk tier: the same answer as for any streamed model, with where its layers are
        return (f"soft unload skipped: a streamed model keeps its placement ({tiers.split(' (')[0]}); use unload "
                "or Force Unload to free it (its disk layers hold no RAM)")
    if device.type != "cuda":
        return "soft unload: model already in RAM"
    if loaded.placement_owner is not None:
        return "soft unload skipped: a streamed or split model keeps its placement (use unload to free it)"
    handle = soft_unload(model)
    loaded.parked = device
    _follow_lora_branches(loaded)  # LoRA branch tensors are no parameters: they move with the layers here
    text = f"soft unload: {handle}; VRAM now {torch.cuda.memory_allocated(device) / GB:.2f} GB"
    log.info("%s", text)
    return text


def restore_model(loaded) -> str:
    """Bring a soft-unloaded model back to the device it left; "" when it was not parked."""
    if loaded.parked is None:
        return ""
    handle = restore(loaded.model, loaded.parked)
    loaded.parked = None
    _follow_lora_branches(loaded)
    text = f"restored: {handle}"
    log.info("%s", text)
    return text


def _follow_lora_branches(loaded) -> None:
    """The LoRA stack's side branches to wherever the layers now are (lora.reapply_after_reload)."""
    if getattr(loaded, "loras", None):
        from .lora import reapply_after_reload

        reapply_after_reload(loaded)


# ------------------------------------------------------------------------------------ the run


def decide_offload(loaded, width: int, height: int, mode: str):
    """The community HunyuanImage-3 loaders' smart-offload rule on the current VRAM state
    (memory/estimate.should_offload); CPU-only: nothing to offload."""
    from ...memory.estimate import OffloadDecision, should_offload

    device = model_device(loaded.model)
    if device.type != "cuda":
        return OffloadDecision(False, "no CUDA device: the model runs on the CPU", "no_cuda", mode)
    free, total = torch.cuda.mem_get_info(device)
    return should_offload(width, height, free, total, loader_reserve_gb=loaded.reserve_gb or 0.0,
                          mode=mode, quantized=loaded.mode in ("int8", "nf4"))


def check_request(request: GenerateRequest) -> None:
    """The choices and numbers of a run, before anything moves: one line naming the input and what it accepts."""
    check_choice("offload_mode", request.offload_mode, OFFLOAD_MODES, error=ValueError)
    check_choice("post_action", request.post_action, POST_ACTIONS, error=ValueError)
    request.budget_override_gb = check_gb("budget_override_gb", request.budget_override_gb,
                                          zero=" (0 = the loader's budget)", error=ValueError)
    if not math.isfinite(float(request.guidance)):  # ComfyUI's range check lets NaN through: a black image
        raise ValueError(f"guidance={request.guidance!r}: give a finite number (the node takes 1 to 20)")


def generate(loaded, request: GenerateRequest, on_step: Callable[[int, int], None] | None = None) -> GenerateResult:
    """One image; see the module docstring for the order of things."""
    from ...memory.tracker import MemoryTracker

    check_request(request)
    notes = []
    from .loader import ensure_loaded

    if ensure_loaded(loaded):
        notes.append("reloaded (the last run unloaded it)")
        _follow_lora_branches(loaded)  # a fresh model: the stack is attached again
    model = loaded.model
    restored = restore_model(loaded)
    if restored:
        notes.append(restored)
    width, height = snap_size(model, request.width, request.height)
    if (width, height) != (request.width, request.height):
        notes.append(f"{request.width}x{request.height} -> bucket {width}x{height}")
    kwargs = dict(prompt=request.prompt, seed=int(request.seed), image_size=(height, width),
                  diff_infer_steps=int(request.steps), diff_guidance_scale=float(request.guidance))
    if request.image is not None:
        param = takes_input_image(model)
        if param is None:
            raise ValueError("this model's generate_image takes no input image (only the Instruct variants do); "
                             "disconnect the image input")
        kwargs[param] = request.image
    decision = decide_offload(loaded, width, height, request.offload_mode)
    log.info("offload decision [%s]: %s", decision.rule, decision.reason)
    if request.offload_mode == "disabled" and decision.mode == "smart":
        log.warning("%s", decision.reason)
    device = model_device(model)
    before = vram_allocated(device)  # "where VRAM was before the run", checked again after an OOM
    override = _apply_budget_override(loaded, request.budget_override_gb, device)
    if override:
        notes.append(override)
    parked: list[str] = []
    if decision.offload:
        parked = park_idle_modules(model, [n for n in IDLE_MODULES if n != "vae"], device)
        if parked:
            notes.append(f"offload: {', '.join(parked)} wait in RAM during the run")
    hook = StepHook(model, int(request.steps), on_step)
    tracker = MemoryTracker()
    image = None
    oom_message = None
    try:
        with tracker, torch.inference_mode(), cast_notice_once():
            image = model.generate_image(**kwargs)
    except torch.OutOfMemoryError as err:
        hook.remove()
        oom_message = _recover_from_oom(loaded, parked, device, before, width, height, request, decision, err)
        parked = []
    except BaseException:  # cancelled from the UI, or a bug: leave the model as it was before the run
        if parked:
            unpark_modules(model, parked, device)
        _undo_budget_override(loaded)
        raise
    finally:
        hook.remove()
    if oom_message is not None:  # raised outside the except block: no reference to the failed frames
        raise GenerationOOM(oom_message)
    if parked:
        unpark_modules(model, parked, device)
    _undo_budget_override(loaded)
    tiers = loaded.tiers_text() if hasattr(loaded, "tiers_text") else ""
    if tiers:
        notes.append(tiers)
    if isinstance(image, (list, tuple)):
        image = image[0]
    report = tracker.report
    post = _post_action(loaded, request.post_action)
    if post:
        notes.append(post)
    steps_seen = hook.count
    status = (f"{loaded.mode.upper()} {width}x{height}, {request.steps} steps, seed {request.seed} | "
              f"offload {decision.mode}: {decision.rule} | {report.wall_s:.1f}s | "
              + (" | ".join(notes) + " | " if notes else "")
              + f"{report.vram_text()} | Peak RAM {report.peak_rss_bytes / GB:.1f}GB")
    log.info("%s", status)
    return GenerateResult(image=image, status=status, width=width, height=height, decision=decision, memory=report,
                          info={"steps_seen": steps_seen, "notes": notes})


def _oom_plan(loaded) -> str:
    """The plan in use (the disk tier's, when there is one) and memory.doctor's advice for this model; never raises."""
    lines = []
    try:
        plan = getattr(loaded, "tier_plan", None)
        if plan is not None:
            lines += ["the plan of the decoder layers in use:", str(plan)]
            tiers = loaded.tiers_text()
            if tiers:
                lines.append(tiers)
    except Exception as err:  # noqa: BLE001 - the OOM message must not turn into another error
        lines.append(f"(plan unavailable: {err})")
    from ...memory.doctor import oom_advice

    lines.append(oom_advice(loaded.path, loaded.budget_bytes, getattr(loaded, "ram_budget_bytes", None)))
    return "\n".join(lines)


def _recover_from_oom(loaded, parked, device, before, width, height, request, decision, err) -> str:
    """Free what the failed run held (its frames pin activations), put parked modules back, measure."""
    err_text = str(err).splitlines()[0][:200]
    _undo_budget_override(loaded)
    clear_exception_refs(err)
    err = None  # our own reference must not pin the frames either
    for _ in range(2):
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if parked:
        unpark_modules(loaded.model, parked, device)
    after = vram_allocated(device)
    drift = (after - before) / max(before, 1)
    mp = width * height / 1e6
    budget = (loaded.budget_bytes or 0) / GB
    msg = (f"out of GPU memory at {width}x{height} ({mp:.2f} MP), budget {budget:.1f} GB, offload "
           f"{decision.mode} ({decision.rule}). Change one of: a lower GPU budget on the loader (more room for "
           f"inference), offload_mode 'smart' or 'always', or a smaller resolution. VRAM after cleanup "
           f"{after / GB:.2f} GB (before the run {before / GB:.2f} GB). [{err_text}]")
    if drift > VRAM_TOLERANCE and device.type == "cuda":  # less than before is fine: nothing leaked
        msg += f" WARNING: VRAM did not return within {VRAM_TOLERANCE:.0%} ({drift:+.1%}); run Force Unload."
    msg += "\n" + _oom_plan(loaded)
    log.error("%s", msg)
    return msg


def _apply_budget_override(loaded, override_gb: float, device) -> str:
    """Per-run budget lower than the decoder layers' VRAM: stream the surplus layers for this run only."""
    loaded.budget_override_streamer = None
    if not override_gb or device.type != "cuda" or loaded.placement_owner is not None:
        return ""
    if getattr(loaded.model, "is_loaded_in_8bit", False):
        return (f"budget override {override_gb:g} GB ignored: bitsandbytes INT8 layers cannot be streamed "
                "(reload with a lower budget or use NF4)")
    from ...memory.streaming import enable_block_streaming

    streamer = enable_block_streaming(loaded.model, device, blocks="model.layers", budget_bytes=int(override_gb * GB))
    loaded.budget_override_streamer = streamer
    return f"budget override {override_gb:g} GB: {streamer.summary()}"


def _undo_budget_override(loaded) -> None:
    streamer = loaded.budget_override_streamer
    if streamer is not None:
        streamer.disable()
        loaded.budget_override_streamer = None


def _post_action(loaded, action: str) -> str:
    if action == "keep":
        return ""
    if action == "soft_unload":
        return soft_unload_model(loaded)
    if loaded.on_unload is not None:
        loaded.on_unload()
    loaded.release()
    return "unloaded"
