"""LoRA on HunyuanImage-3 (``HunyuanImage3ForCausalMM``): safetensors LoRA files as float side branches.

Nothing is merged into a weight, whatever the layer is, so a strength change or a different stack needs no reload:

* our :class:`~comfyui_headroom.quant.linear.Int8Linear` -> its ``lora`` list of ``(down, up, scale)`` branches;
* the stacked experts of a layer (:class:`~comfyui_headroom.quant.grouped.Int8GroupedLinear` /
  :class:`~comfyui_headroom.quant.grouped.GroupedLinear`) -> ``layer.lora[expert]``;
* any other Linear (``nn.Linear`` in bf16/fp32, bitsandbytes ``Linear8bitLt`` / ``Linear4bit``) -> a forward hook
  that adds the branches to the layer's output (removed again by :func:`clear_hunyuan3_loras`).

Targets, by module name in the loaded model: ``model.layers.N.self_attn.{qkv_proj,o_proj}`` (attention),
``model.layers.N.mlp.shared_mlp.{gate_and_up_proj,down_proj}`` (shared expert),
``model.layers.N.mlp.experts.E.{gate_and_up_proj,down_proj}`` (routed experts, per expert, whether the model keeps
them as a ModuleList or stacked), and any other Linear of the model (router ``mlp.gate.wg``, vision, ...) through a
hook. A LoRA on a module that is no Linear (a convolution of the VAE, a norm, an embedding) is refused.

Key formats (one LoRA pair per module; the module part may carry the prefixes ``base_model.model.``,
``transformer.``, ``diffusion_model.``, ``model.`` - tried in that order, stripped repeatedly, and ``model.`` put back
in front when the rest starts at ``layers.``):

* PEFT: ``<module>.lora_A.weight`` [r, in] / ``<module>.lora_B.weight`` [out, r] (also ``lora_A.<adapter>.weight``);
  alpha from ``<module>.alpha`` if present, else from ``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) when the LoRA is a PEFT folder (or its ``adapter_model.safetensors``), else alpha = rank;
* kohya / diffusers: ``<module>.lora_down.weight`` / ``<module>.lora_up.weight`` (+ ``<module>.alpha``), also
  ``<module>.lora.down.weight`` / ``.lora.up.weight``; kohya's underscore names
  (``lora_unet_model_layers_0_self_attn_qkv_proj``) are matched against the model's names with ``.`` -> ``_``;
* fused experts: ``...mlp.experts.<proj>`` with stacked factors ``[E, r, in]`` / ``[E, out, r]`` = one pair per
  expert. A 2-D pair on the fused name (one LoRA shared by all experts, PEFT's ``target_parameters`` layouts) is
  refused with a message saying so.

LoHa / LoKr / DoRA / LoRA biases / full-weight diffs are refused naming the key. Files are read with safetensors
only (never ``torch.load``); ``.ckpt`` / ``.pt`` / ``.bin`` are refused.

The applied stack is recorded on the model (``model._headroom_hunyuan3_loras``): applying again first takes every
branch and hook of the previous stack away, so nothing stacks twice, and a file that did not change on disk is not
read again (its prepared tensors are reused; only the scales change with the strength).

The node glue (nodes/hunyuan3_lora_node.py) works out which stack a node or a generator stands for from ComfyUI's
prompt graph (:func:`stack_for_node`, :func:`stack_for_consumer`); this module imports no ComfyUI.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from ...quant.grouped import GroupedLinear, Int8GroupedLinear
from ...quant.linear import Int8Linear
from ...quant.lora import (
    LoraShapeError,
    PreparedCache,
    apply_side_branches,
    dequantize_int8_lora,
    side_branches,
)

__all__ = [
    "RECORD_ATTR",
    "LoraEntry",
    "LoraFormatError",
    "LoraKeyError",
    "LoraReport",
    "LoraShapeError",
    "applied_stack",
    "apply_hunyuan3_loras",
    "apply_stack",
    "clear_hunyuan3_loras",
    "read_lora",
    "reapply_after_reload",
    "stack_for_consumer",
    "stack_for_node",
    "sync_hunyuan3_loras",
]

RECORD_ATTR = "_headroom_hunyuan3_loras"
PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_")
SAFETENSORS_SUFFIX = ".safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
EXAMPLE_NAMES = ("model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.shared_mlp.down_proj",
                 "model.layers.0.mlp.experts.0.gate_and_up_proj")
KINDS = ("attention", "shared", "experts", "other")


class LoraFormatError(ValueError):
    """A LoRA file that is not a safetensors LoRA we can apply (wrong file type, LoHa/LoKr/DoRA, broken pairs)."""


class LoraKeyError(ValueError):
    """LoRA keys that name no module of the model (the message lists them and what the model's names look like)."""


# ---------------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------------

@dataclass
class LoraPair:
    """One module's factors as the file has them: ``down [r, in]`` (or ``[E, r, in]``), ``up [out, r]``."""

    key: str  # the module part of the file's keys
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: Any = None  # a tensor or a number or None (= rank)


_PAIR_KEY = re.compile(r"^(?P<module>.+?)\.(?:"
                       r"lora_(?P<peft>[AB])(?:\.[^.]+)?\.weight"
                       r"|lora_(?P<kohya>down|up)\.weight"
                       r"|lora\.(?P<old>down|up)\.weight"
                       r"|(?P<alpha>alpha))$")
_REFUSED_PARTS = (
    ("dora_scale", "DoRA (dora_scale)"), ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    ("lora_mid", "a LoRA with a mid (Tucker/conv) factor"), ("hada_", "LoHa"), ("lokr_", "LoKr"),
    (".diff", "a full-weight diff"), ("lora_B.bias", "a LoRA with a bias (lora_bias)"),
    ("lora_up.bias", "a LoRA with a bias"), ("oft_", "OFT"), ("boft_", "BOFT"), ("ia3_", "IA3"),
)


def _lora_files(path: str) -> tuple[str, str | None]:
    """(the safetensors file, the PEFT adapter_config.json next to it or None)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, PEFT_WEIGHTS)
        if not os.path.isfile(weights):
            found = sorted(f for f in os.listdir(path) if f.endswith(SAFETENSORS_SUFFIX))
            if len(found) != 1:
                raise LoraFormatError(f"{path}: a LoRA folder needs {PEFT_WEIGHTS} (or exactly one .safetensors "
                                      f"file); found {found or 'none'}")
            weights = os.path.join(path, found[0])
        config = os.path.join(path, PEFT_CONFIG)
        return weights, config if os.path.isfile(config) else None
    if not path.lower().endswith(SAFETENSORS_SUFFIX):
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (a .ckpt/.pt/.bin file is a pickle "
                              "that can run code when loaded); convert it to safetensors first")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    peft = os.path.basename(path) == PEFT_WEIGHTS and os.path.isfile(config)
    return path, config if peft else None


def _peft_alpha(config_path: str | None) -> Callable[[str, int], float | None]:
    """PEFT's alpha rule from adapter_config.json: ``lora_alpha`` (``alpha_pattern`` per module), times
    ``sqrt(r)`` with ``use_rslora`` (PEFT's scale is then alpha / sqrt(r) = (alpha sqrt(r)) / r)."""
    if config_path is None:
        return lambda key, rank: None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise LoraFormatError(f"{config_path}: cannot read PEFT's adapter config ({err})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{config_path}: not a JSON object")
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def rule(key: str, rank: int) -> float | None:
        value = alpha
        for pattern, pattern_alpha in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", key):
                value = pattern_alpha
                break
        if value is None:
            return None
        return float(value) * math.sqrt(rank) if rslora else float(value)

    return rule


def read_lora(path) -> list[LoraPair]:
    """A LoRA file (or PEFT folder) as one :class:`LoraPair` per module; LoraFormatError for anything that is not
    plain LoRA factors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config = _lora_files(path)
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFormatError(f"{weights}: not a readable safetensors file ({err})") from None
    if any(t.dtype == torch.int8 for t in tensors.values()):
        tensors, _ = dequantize_int8_lora(tensors)
    pairs: dict[str, LoraPair] = {}
    refused, unknown = [], []
    for key, tensor in tensors.items():
        match = _PAIR_KEY.match(key)
        if match is None:
            why = next((what for part, what in _REFUSED_PARTS if part in key), None)
            (refused if why else unknown).append(f"{key} ({why})" if why else key)
            continue
        pair = pairs.setdefault(match["module"], LoraPair(match["module"]))
        side = match["peft"] or match["kohya"] or match["old"]
        if match["alpha"]:
            pair.alpha = tensor
        elif side in ("A", "down"):
            pair.down = tensor
        else:
            pair.up = tensor
    if refused:
        raise LoraFormatError(f"{weights}: not a plain LoRA - {len(refused)} key(s) of another adapter type, "
                              f"e.g. {', '.join(refused[:3])}; only LoRA factors can be side branches")
    if unknown:
        raise LoraFormatError(f"{weights}: {len(unknown)} key(s) that are no LoRA factor, e.g. "
                              f"{', '.join(unknown[:5])}; expected <module>.lora_A.weight / .lora_B.weight (PEFT) or "
                              "<module>.lora_down.weight / .lora_up.weight [/ .alpha] (kohya, diffusers)")
    broken = [p.key for p in pairs.values() if p.down is None or p.up is None]
    if broken:
        raise LoraFormatError(f"{weights}: {len(broken)} module(s) with only one LoRA factor (or only an alpha), "
                              f"e.g. {', '.join(broken[:5])}; the file is incomplete")
    if not pairs:
        raise LoraFormatError(f"{weights}: no LoRA factors in the file")
    alpha_rule = _peft_alpha(config)
    for pair in pairs.values():
        if pair.alpha is None:
            pair.alpha = alpha_rule(pair.key, int(pair.down.shape[-2]))
    return list(pairs.values())


# ---------------------------------------------------------------------------------------------------
# The model's targets
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where one LoRA pair goes: ``how`` is "int8" (Int8Linear.lora), "grouped" (layer.lora[expert]), "hook"
    (any other Linear) or "refused" (not a Linear); "fused" names a whole expert projection (see ``parts``)."""

    name: str
    how: str
    module: nn.Module | None
    expert: int | None = None
    parts: tuple = ()  # "fused": one Target per expert

    @property
    def label(self) -> str:
        return self.name if self.expert is None else f"{self.name}[expert {self.expert}]"


def kind_of(name: str) -> str:
    """attention / shared / experts / other, from a module name."""
    if ".self_attn." in f".{name}.":
        return "attention"
    if ".shared_mlp." in f".{name}.":
        return "shared"
    if ".experts." in f".{name}.":
        return "experts"
    return "other"


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
        and getattr(module, "weight", None) is not None and type(module).__name__.startswith("Linear"))


def _sizes(target: Target) -> tuple[int, int]:
    module = target.module
    return int(module.out_features), int(module.in_features)


def _target_index(model: nn.Module) -> dict[str, Target]:
    index: dict[str, Target] = {}
    fused: dict[str, list[Target]] = collections.defaultdict(list)
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, (GroupedLinear, Int8GroupedLinear)):
            parts = tuple(Target(name, "grouped", module, e) for e in range(module.num_groups))
            index[name] = Target(name, "fused", module, None, parts)
            parent, _, leaf = name.rpartition(".")
            for part in parts:
                index[f"{parent}.{part.expert}.{leaf}" if parent else f"{part.expert}.{leaf}"] = part
            continue
        if isinstance(module, Int8Linear):
            index[name] = Target(name, "int8", module)
        elif _is_linear_like(module):
            index[name] = Target(name, "hook", module)
        elif not list(module.children()) or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            index.setdefault(name, Target(name, "refused", module))
        else:
            continue
        match = re.match(r"^(.*)\.(\d+)\.([^.]+)$", name)
        if match and index[name].how in ("int8", "hook"):
            fused[f"{match[1]}.{match[3]}"].append(index[name])
    for name, parts in fused.items():
        if name not in index:
            order = sorted(parts, key=lambda t: int(re.match(r"^.*\.(\d+)\.[^.]+$", t.name)[1]))
            index[name] = Target(name, "fused", None, None, tuple(order))
    return index


def _candidates(key: str, prefixes: Sequence[str], sep: str) -> list[str]:
    seen, frontier = [], [key]
    while frontier:
        k = frontier.pop(0)
        if k in seen or not k:
            continue
        seen.append(k)
        frontier.extend(k[len(p):] for p in prefixes if k.startswith(p))
    out = []
    for k in seen:
        for c in (k, f"model{sep}{k}"):
            if c not in out:
                out.append(c)
    return out


class _Matcher:
    def __init__(self, index: dict[str, Target]) -> None:
        self.index = index
        underscored: dict[str, list[str]] = collections.defaultdict(list)
        for name in index:
            underscored[name.replace(".", "_")].append(name)
        self.underscored = {k: v[0] for k, v in underscored.items() if len(v) == 1}

    def find(self, key: str) -> Target | None:
        for candidate in _candidates(key, PREFIXES, "."):
            if candidate in self.index:
                return self.index[candidate]
        if "." not in key:  # kohya: lora_unet_model_layers_0_self_attn_qkv_proj
            prefixes = KOHYA_PREFIXES + tuple(p.replace(".", "_") for p in PREFIXES)
            for candidate in _candidates(key, prefixes, "_"):
                if candidate in self.underscored:
                    return self.index[self.underscored[candidate]]
        return None

    def example_names(self) -> list[str]:
        names = [n for n in EXAMPLE_NAMES if n in self.index]
        return names or [n for n, t in self.index.items() if t.how in ("int8", "hook", "grouped")][:3]


# ---------------------------------------------------------------------------------------------------
# Preparing one file against one model
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    """One branch of one file, strength 1: ``scale`` = alpha / rank; tensors on the layer's device."""

    target: Target
    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass
class _PreparedFile:
    path: str
    file_id: tuple
    branches: list[_Prepared]


class _Adapter:
    """The duck-typed adapter :func:`comfyui_headroom.quant.lora.low_rank_of` reads."""

    name = "lora"

    def __init__(self, up, down, alpha):
        self.weights = (up, down, alpha, None, None, None)


def _layer_device(module: nn.Module) -> torch.device:
    weight = getattr(module, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


def _branch_dtype(target: Target, dtype: torch.dtype) -> torch.dtype:
    """A float Linear keeps its own float dtype (the fp32 router stays fp32); everything else: ``dtype``."""
    if target.how == "hook" and type(target.module) is nn.Linear:
        weight_dtype = target.module.weight.dtype
        if weight_dtype in (torch.float32, torch.float16, torch.bfloat16):
            return weight_dtype
    return dtype


_NO_CACHE = PreparedCache(max_bytes=0)


def _file_id(path: str) -> tuple:
    weights, config = _lora_files(path)
    stat = os.stat(weights)
    config_stamp = os.stat(config).st_mtime_ns if config else None
    return (os.path.realpath(weights), stat.st_size, stat.st_mtime_ns, config_stamp)


def _prepare_file(path: str, matcher: _Matcher, dtype: torch.dtype) -> _PreparedFile:
    pairs = read_lora(path)
    unmatched, refused, shape_problems = [], [], []
    branches: list[_Prepared] = []
    for pair in pairs:
        target = matcher.find(pair.key)
        if target is None:
            unmatched.append(pair.key)
            continue
        if target.how == "refused":
            refused.append(f"{pair.key} -> {target.name} ({type(target.module).__name__})")
            continue
        if target.how == "fused":
            if pair.down.ndim != 3 or pair.up.ndim != 3:
                shape_problems.append(
                    f"{pair.key} -> {target.name}: one {pair.down.ndim}-D LoRA pair for all {len(target.parts)} "
                    "experts of a fused projection; only per-expert LoRAs (experts.E.<proj>) or stacked factors "
                    "[E, r, in] / [E, out, r] are supported")
                continue
            if pair.down.shape[0] != len(target.parts) or pair.up.shape[0] != len(target.parts):
                shape_problems.append(f"{pair.key} -> {target.name}: factors for {pair.down.shape[0]}/"
                                      f"{pair.up.shape[0]} experts, the model has {len(target.parts)}")
                continue
            jobs = [(part, pair.down[e], pair.up[e]) for e, part in enumerate(target.parts)]
        else:
            if pair.down.ndim == 3 or pair.up.ndim == 3:
                shape_problems.append(f"{pair.key} -> {target.label}: stacked 3-D factors "
                                      f"{tuple(pair.down.shape)} / {tuple(pair.up.shape)} on a single layer")
                continue
            jobs = [(target, pair.down, pair.up)]
        for part, down, up in jobs:
            out_features, in_features = _sizes(part)
            try:
                made = side_branches([(1.0, _Adapter(up, down, pair.alpha), 1.0, None, None)],
                                     f"{pair.key} -> {part.label}", out_features, in_features,
                                     device=_layer_device(part.module), dtype=_branch_dtype(part, dtype),
                                     cache=_NO_CACHE)
            except LoraShapeError as err:
                shape_problems.append(str(err))
                continue
            except ValueError as err:  # UnsupportedPatchError: ranks of up and down differ
                shape_problems.append(str(err))
                continue
            for d, u, scale in made:
                branches.append(_Prepared(part, d, u, scale))
    if unmatched:
        raise LoraKeyError(
            f"{path}: {len(unmatched)} of {len(pairs)} LoRA module(s) match no module of the model, e.g. "
            f"{', '.join(unmatched[:5])}. The model's names look like {', '.join(matcher.example_names())}; "
            f"tried the keys as they are, with the prefixes {', '.join(PREFIXES)} stripped and 'model.' put in "
            "front (kohya underscore names: with lora_unet_/lora_transformer_/lora_ stripped). Is this a LoRA for "
            "HunyuanImage-3?")
    if refused:
        raise LoraFormatError(f"{path}: LoRA on modules that are no Linear layer (only Linear layers take a side "
                              f"branch): {', '.join(refused[:5])}")
    if shape_problems:
        raise LoraShapeError(f"{path}: {len(shape_problems)} LoRA pair(s) do not fit the model: "
                             + "; ".join(shape_problems[:5]))
    return _PreparedFile(path, _file_id(path), branches)


# ---------------------------------------------------------------------------------------------------
# Applying a stack
# ---------------------------------------------------------------------------------------------------

@dataclass
class LoraReport:
    """What :func:`apply_hunyuan3_loras` attached."""

    files: list[tuple[str, float, int]] = field(default_factory=list)  # (path, strength, branches); strength 0 = 0
    layers: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})  # layers (experts) per kind
    branch_bytes: int = 0
    hooks: int = 0

    def summary(self) -> str:
        if not self.files:
            return "LoRA: none"
        lines = [f"LoRA: {os.path.basename(p)} x {s:g}" + ("" if n else " (off)") for p, s, n in self.files]
        touched = ", ".join(f"{k} {v}" for k, v in self.layers.items() if v)
        lines.append(f"layers: {touched or 'none'}; branch tensors {self.branch_bytes / 2**20:.1f} MB"
                     + (f"; {self.hooks} hooked layers" if self.hooks else ""))
        return "\n".join(lines)


@dataclass
class _Record:
    """What is attached now (on the model as ``RECORD_ATTR``)."""

    stack: list[tuple[str, float]]
    prepared: dict[tuple, _PreparedFile]
    int8: list[tuple[Int8Linear, tuple]] = field(default_factory=list)
    grouped: list[tuple[nn.Module, int, tuple]] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    report: LoraReport = field(default_factory=LoraReport)


def _hook(branches, module, args, kwargs, output):
    x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
    if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
        return output
    if x.device != output.device:  # an accelerate offload hook moved the input inside forward
        x = x.to(output.device)
    return apply_side_branches(x, output, branches)


def _normalise(loras) -> list[tuple[str, float]]:
    stack = []
    for item in loras:
        path, strength = item[0], item[1]
        strength = float(strength)
        if not math.isfinite(strength):
            raise ValueError(f"LoRA {path}: strength {strength} is not a finite number")
        stack.append((os.fspath(path), strength))
    return stack


def clear_hunyuan3_loras(model: nn.Module) -> bool:
    """Take every branch and hook that :func:`apply_hunyuan3_loras` attached away; True when there were any."""
    record: _Record | None = getattr(model, RECORD_ATTR, None)
    if record is None:
        return False
    for handle in record.hooks:
        handle.remove()
    for layer, branch in record.int8:
        layer.lora = [b for b in layer.lora if b is not branch]
    for layer, expert, branch in record.grouped:
        kept = [b for b in layer.lora.get(expert, []) if b is not branch]
        if kept:
            layer.lora[expert] = kept
        else:
            layer.lora.pop(expert, None)
    delattr(model, RECORD_ATTR)
    return True


def applied_stack(model: nn.Module | None) -> list[tuple[str, float]] | None:
    """The stack attached to ``model`` now (``[(path, strength)]``), or None when none is."""
    record = getattr(model, RECORD_ATTR, None) if model is not None else None
    return list(record.stack) if record is not None else None


def apply_hunyuan3_loras(model: nn.Module, loras: Sequence, dtype: torch.dtype = torch.bfloat16) -> LoraReport:
    """Attach the stack ``loras`` (``[(path, strength), ...]``; items may have more fields after these two) to
    ``model`` in place of whatever stack was attached before. Strength 0 drops that LoRA; several LoRAs on one
    layer add up. Every file is read and checked against the model before anything changes: on an error the
    previous stack stays attached."""
    stack = _normalise(loras)
    record: _Record | None = getattr(model, RECORD_ATTR, None)
    old = record.prepared if record is not None else {}
    matcher: _Matcher | None = None
    prepared: dict[tuple, _PreparedFile] = {}
    file_ids: list[tuple | None] = []
    for path, strength in stack:
        if strength == 0.0:
            file_ids.append(None)
            continue
        fid = _file_id(path)
        file_ids.append(fid)
        if fid in prepared:
            continue
        if fid in old:
            prepared[fid] = old[fid]
            continue
        if matcher is None:
            matcher = _Matcher(_target_index(model))
        prepared[fid] = _prepare_file(path, matcher, dtype)

    clear_hunyuan3_loras(model)
    new = _Record(stack=stack, prepared=prepared)
    report = new.report
    hooked: dict[int, list] = {}
    touched: set[tuple[str, int | None]] = set()
    counted: set[int] = set()
    for (path, strength), fid in zip(stack, file_ids):
        if fid is None:
            report.files.append((path, strength, 0))
            continue
        pfile = prepared[fid]
        for item in pfile.branches:
            device = _layer_device(item.target.module)
            if item.down.device != device:  # the model moved since the file was prepared
                item.down, item.up = item.down.to(device), item.up.to(device)
            branch = (item.down, item.up, strength * item.scale)
            target = item.target
            if target.how == "int8":
                target.module.lora = list(target.module.lora) + [branch]
                new.int8.append((target.module, branch))
            elif target.how == "grouped":
                target.module.lora[target.expert] = list(target.module.lora.get(target.expert, [])) + [branch]
                new.grouped.append((target.module, target.expert, branch))
            else:
                branches = hooked.get(id(target.module))
                if branches is None:
                    branches = hooked[id(target.module)] = []
                    new.hooks.append(target.module.register_forward_hook(partial(_hook, branches), with_kwargs=True))
                branches.append(branch)
            touched.add((target.name, target.expert))
            for t in (item.down, item.up):
                if id(t) not in counted:
                    counted.add(id(t))
                    report.branch_bytes += t.numel() * t.element_size()
        report.files.append((path, strength, len(pfile.branches)))
    for name, _ in touched:
        report.layers[kind_of(name)] += 1
    report.hooks = len(new.hooks)
    if stack:
        setattr(model, RECORD_ATTR, new)
    return report


# ---------------------------------------------------------------------------------------------------
# The stack of a LoadedModel (integrations/hunyuan3/loader.LoadedModel.loras) and ComfyUI's graph
# ---------------------------------------------------------------------------------------------------

class LoraEntry(NamedTuple):
    """One LoRA of a stack: ``(path, strength)`` plus the node that added it and the name it showed."""

    path: str
    strength: float
    node: str | None = None
    name: str = ""


def apply_stack(loaded, stack: Sequence) -> LoraReport | None:
    """Make ``stack`` the LoadedModel's stack (``loaded.loras``) and attach it if the weights are loaded (else
    :func:`reapply_after_reload` attaches it after the reload). The previous stack is checked-then-replaced."""
    stack = list(stack)
    report = None
    if loaded.model is not None:
        report = apply_hunyuan3_loras(loaded.model, stack)
    loaded.loras = stack
    return report


def reapply_after_reload(loaded) -> LoraReport | None:
    """For the generator, after ``ensure_loaded``: attach ``loaded.loras`` when the model does not carry exactly
    that stack (a fresh model after a reload carries none). Also moves the branch tensors to where the layers are
    now (call it after a soft unload - the branches are no parameters, so parking leaves them on the GPU otherwise -
    and after the restore). None when there is nothing to do."""
    model = loaded.model
    if model is None:
        return None
    stack = _normalise(getattr(loaded, "loras", None) or [])
    if applied_stack(model) == stack and not _moved(model):
        return None
    if not stack and applied_stack(model) is None:
        return None
    return apply_hunyuan3_loras(model, stack)


sync_hunyuan3_loras = reapply_after_reload  # the same call after a soft unload / restore: branches follow the layers


def _moved(model: nn.Module) -> bool:
    record: _Record | None = getattr(model, RECORD_ATTR, None)
    if record is None:
        return False
    return any(item.down.device != _layer_device(item.target.module)
               for pfile in record.prepared.values() for item in pfile.branches[:1])


# The entries the LoRA nodes recorded when they last ran, by node id: a node's strength may come through a link
# (no literal in the prompt), and then the value it ran with is only known here.
_NODE_ENTRIES: collections.OrderedDict[str, LoraEntry] = collections.OrderedDict()
_NODE_LOCK = threading.Lock()
_MAX_NODE_ENTRIES = 512
NODE_CLASS = "Hunyuan3LoRA"


def remember_node_entry(entry: LoraEntry) -> None:
    if entry.node is None:
        return
    with _NODE_LOCK:
        _NODE_ENTRIES[entry.node] = entry
        _NODE_ENTRIES.move_to_end(entry.node)
        while len(_NODE_ENTRIES) > _MAX_NODE_ENTRIES:
            _NODE_ENTRIES.popitem(last=False)


def upstream_lora_nodes(prompt: Mapping | None, node_id, input_name: str = "model",
                        class_type: str = NODE_CLASS) -> list[str] | None:
    """The LoRA nodes that feed ``node_id``'s ``input_name`` in ComfyUI's prompt (API format), nearest to the
    loader first; None when the prompt does not say (no prompt, node missing)."""
    if not isinstance(prompt, Mapping) or node_id is None or str(node_id) not in prompt:
        return None
    chain: list[str] = []
    current = str(node_id)
    while True:
        inputs = (prompt.get(current) or {}).get("inputs") or {}
        link = inputs.get(input_name)
        if not (isinstance(link, (list, tuple)) and link):
            break
        upstream = str(link[0])
        node = prompt.get(upstream)
        if not isinstance(node, Mapping) or node.get("class_type") != class_type or upstream in chain:
            break
        chain.append(upstream)
        current = upstream
        input_name = "model"
    return list(reversed(chain))


def _entry_of(prompt: Mapping, node_id: str, resolve: Callable[[str], str] | None,
              known: Sequence[LoraEntry]) -> LoraEntry:
    """An upstream LoRA node's entry: its literal widget values in the prompt (the truth of this run), else what it
    ran with (linked inputs), else what the model's stack says about it."""
    inputs = (prompt.get(node_id) or {}).get("inputs") or {}
    name, strength = inputs.get("lora_name"), inputs.get("strength")
    if isinstance(name, str) and isinstance(strength, (int, float)) and not isinstance(strength, bool):
        path = resolve(name) if resolve is not None else name
        return LoraEntry(path, float(strength), node_id, name)
    with _NODE_LOCK:
        entry = _NODE_ENTRIES.get(node_id)
    if entry is None:
        entry = next((e for e in known if e.node == node_id), None)
    if entry is None:
        raise ValueError(f"Hunyuan 3 LoRA: cannot tell which LoRA node {node_id} (upstream) applies - its inputs "
                         "come through links and it has not run yet; run the workflow again")
    return entry


def stack_for_node(upstream_stack: Sequence, own: LoraEntry, prompt: Mapping | None = None,
                   resolve: Callable[[str], str] | None = None) -> list[LoraEntry]:
    """The stack a LoRA node stands for: the LoRA nodes above it in the graph, then its own entry.

    With ComfyUI's prompt the chain is read from the graph (so re-running only this node, or any change above
    it, gives the same answer as a full run). Without one (a script): the model's current stack with this node's
    earlier entry (same ``node``) replaced in place, else appended."""
    remember_node_entry(own)
    known = [e if isinstance(e, LoraEntry) else LoraEntry(e[0], float(e[1])) for e in (upstream_stack or [])]
    chain = upstream_lora_nodes(prompt, own.node)
    if chain is not None:
        return [_entry_of(prompt, node_id, resolve, known) for node_id in chain] + [own]
    if own.node is not None and any(e.node == own.node for e in known):
        return [own if e.node == own.node else e for e in known]
    return known + [own]


def stack_for_consumer(prompt: Mapping | None, node_id, resolve: Callable[[str], str] | None = None,
                       input_name: str = "model") -> list[LoraEntry] | None:
    """The stack a node that takes the model (a generator) should sample with, from the graph: the LoRA nodes
    that feed its ``input_name``; ``[]`` when the model comes straight from a loader; None without a prompt (then
    keep ``loaded.loras``)."""
    chain = upstream_lora_nodes(prompt, node_id, input_name)
    if chain is None:
        return None
    return [_entry_of(prompt, n, resolve, []) for n in chain]
