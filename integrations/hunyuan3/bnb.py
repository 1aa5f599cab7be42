"""bitsandbytes on the transformers road: configs and the skip list in the form transformers understands.

Our skip patterns are plain substrings (as in the community HunyuanImage-3 loaders; ``quant/skip.py``),
but transformers matches ``llm_int8_skip_modules`` its own way, and differently per version: 5.x matches a
key at the *start* of a Linear's full name up to a module boundary, or as a suffix (so those loaders'
``"self_attn"`` keeps nothing there), while 4.x matched ``key + "."`` anywhere. Rather than guess,
:func:`bnb_skip_modules` resolves our patterns against the model's real module tree (built on the meta
device) and hands transformers the covering module paths: exact names mean the same thing under both
rules. It then checks the list with the installed transformers' own matcher, so a mismatch fails before
loading.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ...quant.skip import ATTENTION_SKIP_PATTERNS, DEFAULT_SKIP_PATTERNS, matching_pattern

# The MoE router of every layer (``model.layers.N.mlp.gate.wg``, a float32 Linear): quantizing it
# changes which experts fire. Not ``mlp.gate`` - as a substring that also names every
# ``mlp.gate_and_up_proj``, i.e. all experts would silently stay bf16.
ROUTER_SKIP_PATTERNS: tuple[str, ...] = ("mlp.gate.wg",)

# The community HunyuanImage-3 loaders' list (VAE, vision tower, embedders, final layers, attention) + the router.
HUNYUAN3_SKIP_PATTERNS: tuple[str, ...] = DEFAULT_SKIP_PATTERNS + ATTENTION_SKIP_PATTERNS + ROUTER_SKIP_PATTERNS

MODES = ("int8", "nf4")


class SkipListMismatch(RuntimeError):
    """The skip list would not keep exactly the intended layers under this transformers version."""


def hunyuan3_skip_patterns(extra: Sequence[str] | str | None = None, keep_attention: bool = True) -> list[str]:
    """The default patterns for HunyuanImage-3 (+ the caller's, comma/newline separated or a list)."""
    base = DEFAULT_SKIP_PATTERNS + (ATTENTION_SKIP_PATTERNS if keep_attention else ()) + ROUTER_SKIP_PATTERNS
    patterns = list(base)
    if isinstance(extra, str):
        extra = [p.strip() for p in extra.replace("\n", ",").split(",")]
    for p in extra or ():
        p = p.strip()
        if p and p not in patterns:
            patterns.append(p)
    return patterns


def convertible_linears(model: nn.Module) -> list[str]:
    """Full names of the layers bitsandbytes would replace (transformers converts exactly ``nn.Linear``)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


@dataclass
class SkipPlan:
    """Which Linear layers stay in float, which get quantized, and the list handed to transformers."""

    keep: dict[str, str] = field(default_factory=dict)  # layer -> the pattern that keeps it
    quantize: list[str] = field(default_factory=list)
    modules_to_not_convert: list[str] = field(default_factory=list)


def plan_skips(linear_names: Iterable[str], patterns: Sequence[str]) -> SkipPlan:
    """Decide every Linear with our substring semantics and compress the kept ones to module paths.

    A kept layer is represented by its highest ancestor that contains no layer to quantize (``vae``,
    ``model.layers.3.self_attn``, ``model.layers.3.mlp.gate``), so the list stays short (about
    3 entries per decoder layer for the real model) and names whole modules.
    """
    names = list(linear_names)
    plan = SkipPlan()
    for name in names:
        pattern = matching_pattern(name, patterns)
        if pattern is None:
            plan.quantize.append(name)
        else:
            plan.keep[name] = pattern
    quantized_prefixes: set[str] = set()
    for name in plan.quantize:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            quantized_prefixes.add(".".join(parts[:i]))
    covers: set[str] = set()
    for name in plan.keep:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in quantized_prefixes:
                covers.add(prefix)
                break
    plan.modules_to_not_convert = sorted(covers, key=lambda p: (p.count("."), p))
    return plan


def transformers_keeps(name: str, modules_to_not_convert: Sequence[str]) -> bool:
    """Would the installed transformers leave the Linear ``name`` unconverted? (its own matcher)"""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers 4.x: the layer's short name, "key." anywhere in its name, or the name
        short = name.rsplit(".", 1)[-1]
        return short in modules_to_not_convert or any(
            (key + "." in name) or key == name for key in modules_to_not_convert)
    return not should_convert_module(name, list(modules_to_not_convert))


def verify_skip_plan(plan: SkipPlan) -> None:
    """Raise :class:`SkipListMismatch` unless transformers keeps exactly ``plan.keep``."""
    wrong_keep = [n for n in plan.quantize if transformers_keeps(n, plan.modules_to_not_convert)]
    wrong_quant = [n for n in plan.keep if not transformers_keeps(n, plan.modules_to_not_convert)]
    if wrong_keep or wrong_quant:
        raise SkipListMismatch(
            "the bitsandbytes skip list does not match the intended layers under this transformers version: "
            f"would stay float but should be quantized: {wrong_keep[:5]}; would be quantized but should stay "
            f"float: {wrong_quant[:5]}")


def bnb_skip_modules(model: nn.Module, patterns: Sequence[str]) -> SkipPlan:
    """Plan + verify for a model (a meta-device skeleton is enough)."""
    plan = plan_skips(convertible_linears(model), patterns)
    verify_skip_plan(plan)
    return plan


def bnb_config(mode: str, modules_to_not_convert: Sequence[str], fp32_cpu_offload: bool = False,
               compute_dtype: torch.dtype = torch.bfloat16):
    """A ``BitsAndBytesConfig`` for INT8 (LLM.int8, no fp16 weights) or NF4 (double quant, bf16 compute).

    ``fp32_cpu_offload`` stays False with ``device_map="auto"`` (as the community HunyuanImage-3 loaders do):
    CPU offload is steered by ``max_memory``. It is only set when we pass an explicit map that puts
    *unquantized* modules on the CPU, which transformers otherwise rejects.
    """
    from transformers import BitsAndBytesConfig

    skip = list(modules_to_not_convert)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip,
                                  llm_int8_enable_fp32_cpu_offload=fp32_cpu_offload)
    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
                                  llm_int8_enable_fp32_cpu_offload=fp32_cpu_offload)
    raise ValueError(f"bitsandbytes mode must be one of {MODES}, got {mode!r}")


def quantized_bytes_per_param(mode: str) -> float:
    """Weight bytes per parameter after quantization (+ scales / absmax, rounded up)."""
    return {"int8": 1.0 + 4 / 4096, "nf4": 0.5 + 4 / 64 / 256 * 4}[mode]


def bnb_int8_dequantize(weight_int8: torch.Tensor, scb: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """LLM.int8 row-wise layout on disk: ``W = int8 * SCB[:, None] / 127``."""
    return (weight_int8.float() * (scb.float()[:, None] / 127.0)).to(dtype)


# ------------------------------------------------------------------------------ the cast notice, once

# bitsandbytes' LLM.int8 matmul says this for every layer at every call when the input is not float16 (ours is
# bf16): thousands of identical lines per image. It is harmless (the int8 matmul takes fp16 inputs).
CAST_NOTICE = "MatMul8bitLt: inputs will be cast from"
BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"  # the logger of bitsandbytes >= 0.46; older ones warn()


class _OncePerProcess(logging.Filter):
    """Lets the first cast notice through (saying the repeats are hidden) and drops the others."""

    def __init__(self):
        super().__init__()
        self.shown = False
        self._lock = threading.Lock()

    def first(self) -> bool:
        with self._lock:
            first, self.shown = not self.shown, True
        return first

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(CAST_NOTICE):
            return True
        if not self.first():
            return False
        record.msg = f"{record.msg} (said once; the same notice for every layer and step is hidden)"
        return True


CAST_NOTICE_FILTER = _OncePerProcess()
_scopes = 0
_scopes_lock = threading.Lock()


@contextmanager
def cast_notice_once():
    """While our load/generate runs: bitsandbytes' cast notice once per process, through its logger or the
    warnings module; every other message passes as before, and nothing changes outside this scope."""
    global _scopes
    logger = logging.getLogger(BNB_MATMUL_LOGGER)
    with _scopes_lock:
        if _scopes == 0:
            logger.addFilter(CAST_NOTICE_FILTER)
        _scopes += 1
    try:
        with warnings.catch_warnings():
            # "always": our check below decides, not the per-module registry (which forgets on every filter change)
            warnings.filterwarnings("always", message=re.escape(CAST_NOTICE))
            show = warnings.showwarning

            def show_once(message, category, filename, lineno, file=None, line=None):
                if str(message).startswith(CAST_NOTICE) and not CAST_NOTICE_FILTER.first():
                    return
                show(message, category, filename, lineno, file, line)

            warnings.showwarning = show_once
            yield
    finally:
        with _scopes_lock:
            _scopes -= 1
            if _scopes == 0:
                logger.removeFilter(CAST_NOTICE_FILTER)
