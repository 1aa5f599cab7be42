"""Installing fused forwards on one model's block instances, and the per-call choice fused / ComfyUI's own.

A block instance gets a subclass of its own class (built once per class) whose ``forward`` calls the family's
fused function; that function raises :class:`~.pieces.FallBack` (with a reason) when this call must run
ComfyUI's forward. Counters on the instance say how many calls went each way and why (:func:`fused_stats`).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections import Counter

import torch

from ....kernels.dispatch import force_kernel
from ....quant.linear import int8_layers
from .pieces import FallBack, layer_problem

FUSE_CHOICES = ("auto", "on", "off")
FUSE_ENV = "HEADROOM_FUSE_BLOCKS"

# One module per model family; each has FORWARDS = {"comfy module:ClassQualname": fused forward}. Exact classes
# only: a subclass (Wan's VACE block, say) has a forward of its own and keeps it.
FAMILIES = ("flux", "wan", "qwen_image", "lumina", "kandinsky5")


@functools.lru_cache(maxsize=None)
def fused_forwards() -> dict:
    """ComfyUI block class key -> its fused forward, over all families."""
    table = {}
    for family in FAMILIES:
        table.update(importlib.import_module(f"{__package__}.{family}").FORWARDS)
    return table


def fuse_mode(value: str | None = "auto") -> str:
    """The effective mode: ``value`` itself, except that ``auto`` (or None) takes ``HEADROOM_FUSE_BLOCKS`` when it
    is set. ValueError naming the choices for anything else."""
    value = (value or "auto").strip().lower()
    if value not in FUSE_CHOICES:
        raise ValueError(f"fuse_blocks must be one of {', '.join(FUSE_CHOICES)}; got {value!r}")
    if value == "auto":
        env = os.environ.get(FUSE_ENV, "").strip().lower()
        if env and env not in FUSE_CHOICES:
            raise ValueError(f"{FUSE_ENV}={env!r}: use one of {', '.join(FUSE_CHOICES)} (or leave it unset)")
        value = env or "auto"
    return value


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _first_problem(block, args, kwargs) -> str | None:
    """Why this call cannot be fused, from what every family shares: the mode, gradients, and any INT8 layer of the
    block with a LoRA branch, rotation, patch functions or a weight elsewhere. Decided before the family's forward
    runs, so that inside a ``torch.compile`` trace no exception is raised for it (one crossing a graph break costs
    another break); only there is the kernel choice checked here too (eager: the family checks it per stream)."""
    if block._headroom_fuse_mode == "off":
        return "fusing off"
    if torch.is_grad_enabled():
        return "gradients enabled"
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if x is None:
        return "no tensor argument"
    compiling = torch.compiler.is_compiling()
    for layer in block._headroom_int8_layers:
        problem = layer_problem(layer, x, block._headroom_fuse_mode, check_kernel=compiling)
        if problem:
            return problem
    return None


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    """``cls`` with a forward that tries the fused path first (one subclass per ComfyUI class)."""
    fused = fused_forwards()[_class_key(cls)]

    def forward(self, *args, **kwargs):
        try:
            reason = _first_problem(self, args, kwargs)
            if reason:
                raise FallBack(reason)
            if self._headroom_compute == "auto":
                out = fused(self, self._headroom_fuse_mode, *args, **kwargs)
            else:  # the kernel chosen for this model (ops._int8_forward does the same per layer)
                with force_kernel(self._headroom_compute):
                    out = fused(self, self._headroom_fuse_mode, *args, **kwargs)
        except FallBack as why:
            if not torch.compiler.is_compiling():  # a counter in a traced graph would be a guard: recompiles
                self._headroom_fallbacks[why.args[0]] += 1
            return cls.forward(self, *args, **kwargs)
        if not torch.compiler.is_compiling():
            self._headroom_fused_calls += 1
        return out

    forward.__doc__ = f"{cls.__name__}.forward, fused where the INT8 layers take producer rows (headroom)."
    return type(f"HeadroomFused{cls.__name__}", (cls,), {"forward": forward, "_headroom_base": cls})


def install_fused_blocks(model: torch.nn.Module, mode: str = "auto", compute: str = "auto") -> int:
    """Give every block of ``model`` whose class has a fused forward that forward (this instance only); ``compute``
    is the model's kernel choice (``Int8LoadConfig.compute``). Installing again updates mode and compute.
    -> the number of blocks that have a fused forward."""
    mode = fuse_mode(mode)
    count = 0
    for module in model.modules():
        cls = getattr(type(module), "_headroom_base", type(module))
        if _class_key(cls) not in fused_forwards():
            continue
        if type(module) is cls:
            module.__class__ = _fused_class(cls)
            module._headroom_fused_calls = 0
            module._headroom_fallbacks = Counter()
        module._headroom_int8_layers = tuple(layer for _, layer in int8_layers(module))
        module._headroom_fuse_mode = mode
        module._headroom_compute = compute
        count += 1
    return count


def uninstall_fused_blocks(model: torch.nn.Module) -> int:
    """Give every block its ComfyUI class back. -> blocks restored."""
    count = 0
    for module in model.modules():
        base = getattr(type(module), "_headroom_base", None)
        if base is not None:
            module.__class__ = base
            count += 1
    return count


def fused_stats(model: torch.nn.Module) -> dict:
    """``{"blocks", "mode", "fused_calls", "fallback_calls", "fallbacks": {reason: calls}}`` over ``model``'s
    blocks with a fused forward (eager calls since install; calls inside ``torch.compile`` are not counted)."""
    blocks, fused, reasons, modes = 0, 0, Counter(), set()
    for module in model.modules():
        if getattr(type(module), "_headroom_base", None) is None:
            continue
        blocks += 1
        fused += module._headroom_fused_calls
        reasons.update(module._headroom_fallbacks)
        modes.add(module._headroom_fuse_mode)
    return {"blocks": blocks, "mode": "/".join(sorted(modes)) or None, "fused_calls": fused,
            "fallback_calls": sum(reasons.values()), "fallbacks": dict(reasons)}
