"""Where the modules of a transformers model go under a VRAM budget (the HunyuanImage-3 road).

- :func:`resolve_budget` / :func:`max_memory_for_budget`: the community HunyuanImage-3 loaders'
  ``max_memory={gpu: budget, "cpu": ...}`` for ``device_map="auto"``; budget 0 means 55 % of the card.
  :func:`max_memory_for_budgets`: the same with one budget per GPU (``gpu_budgets_gb="40,40"``, issue #9).
- :func:`manual_device_map`: those loaders' "optimal device map" (critical modules + the first N decoder layers
  on the GPU, the rest on the CPU), generated from N instead of typed by hand, and
  :func:`validate_device_map`, which names what a map forgets (their own example lost
  ``model.layers.24``) before anything is loaded.
- :func:`plan_quantized_map`: for bitsandbytes, a map that never puts a quantized layer on the CPU
  (transformers rejects that): idle float modules go to the CPU first, then whole decoder layers,
  which then stay in float there.
- :func:`describe_placement`: bytes and modules per device after a load (:class:`PlacementSummary`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ...memory.budgets import clamp_to_card
from ...memory.planner import default_budget_bytes
from ...units import GB
from .inputs import BUDGET_ZERO, check_gb

log = logging.getLogger("comfyui_headroom")

# Float modules the denoising loop does not touch (the vision tower and aligner only see input images,
# lm_head only picks the size in "auto" mode, the VAE runs once at the end): first to leave the GPU.
IDLE_MODULES = ("vision_model", "vision_aligner", "lm_head", "vae")
LAYERS_PREFIX = "model.layers"


class DeviceMapError(ValueError):
    """A device map that does not place every module exactly once."""


def resolve_budget(budget_gb: float, total_bytes: int | None) -> int:
    """Bytes of VRAM for weights: ``budget_gb`` (GiB, 0 to :data:`MAX_GB`), or 55 % of ``total_bytes`` when 0
    (the community HunyuanImage-3 loaders' rule); a budget above the card is clamped to it, as memory/'s
    planner does (:func:`clamp_to_card`)."""
    budget_gb = check_gb("gpu_budget_gb", budget_gb, zero=BUDGET_ZERO)
    if budget_gb > 0:
        return clamp_to_card(int(budget_gb * GB), total_bytes, "gpu_budget_gb")
    if not total_bytes:
        raise ValueError("GPU budget 0 (auto) needs a CUDA device to size 55 % of; set a budget in GB")
    return default_budget_bytes(total_bytes)


def cpu_allowance_bytes(reserve_gb: float = 4.0) -> int:
    """RAM that weights may take: what is available now minus a reserve for the OS and ComfyUI."""
    import psutil

    return max(int(psutil.virtual_memory().available - reserve_gb * GB), 1 * GB)


def max_memory_for_budget(budget_gb: float, device: int = 0, total_bytes: int | None = None,
                          external_vram_gb: float = 0.0, cpu_bytes: int | None = None) -> dict:
    """``max_memory`` for ``from_pretrained(device_map="auto")``.

    ``external_vram_gb``: VRAM other programs (or other nodes' models) hold on that card; it comes off the
    budget so the weights plus the inference reserve still fit.
    """
    if isinstance(budget_gb, str):  # "40,40": one budget per GPU (multi-GPU, issue #9)
        return max_memory_for_budgets(budget_gb, external_vram_gb=external_vram_gb, cpu_bytes=cpu_bytes)
    if total_bytes is None and torch.cuda.is_available():
        total_bytes = torch.cuda.get_device_properties(device).total_memory
    budget = resolve_budget(budget_gb, total_bytes) - int(check_gb("external_vram_gb", external_vram_gb) * GB)
    if budget <= 0:
        raise ValueError(f"GPU budget {budget_gb} GB minus external VRAM {external_vram_gb} GB leaves nothing "
                         "for weights; raise the budget or lower external_vram_gb")
    return {device: budget, "cpu": cpu_bytes if cpu_bytes is not None else cpu_allowance_bytes()}


def max_memory_for_budgets(gpu_budgets_gb, device_count: int | None = None, device_totals: Sequence[int] | None = None,
                           external_vram_gb: float = 0.0, cpu_bytes: int | None = None,
                           need_bytes: int | None = None) -> dict:
    """``max_memory`` with one entry per GPU from ``gpu_budgets_gb`` (``"40,40"``, ``"24"`` = each GPU; see
    :func:`~comfyui_headroom.memory.budgets.parse_gpu_budgets`). ``device_count`` / ``device_totals``
    default to the CUDA devices present. ``external_vram_gb`` comes off every GPU's budget. ``need_bytes``:
    what must sit on the GPUs (critical layers); budgets summing below it raise :class:`PlanError`."""
    from ...memory.budgets import check_budgets_cover, parse_gpu_budgets

    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_totals is None and device_count and torch.cuda.is_available() and device_count <= torch.cuda.device_count():
        # Only GPUs this machine has (a plan for a larger machine passes its budgets, or device_totals).
        device_totals = [torch.cuda.get_device_properties(i).total_memory for i in range(device_count)]
    external = check_gb("external_vram_gb", external_vram_gb)
    budgets = parse_gpu_budgets(gpu_budgets_gb, device_count, device_totals)  # ranges checked, clamped to the cards
    for i in budgets:
        budgets[i] -= int(external * GB)
        if budgets[i] <= 0:
            raise ValueError(f"cuda:{i}: GPU budget from gpu_budgets_gb={gpu_budgets_gb!r} minus external VRAM "
                             f"{external_vram_gb} GB leaves nothing for weights; raise it or lower external_vram_gb")
    if need_bytes is not None:
        check_budgets_cover(budgets, need_bytes)
    return {**budgets, "cpu": cpu_bytes if cpu_bytes is not None else cpu_allowance_bytes()}


# ------------------------------------------------------------------------------------------ maps


def top_level_units(model: nn.Module, layers_prefix: str = LAYERS_PREFIX) -> list[str]:
    """The units a map assigns: each decoder layer, and every other module that holds tensors directly
    or is a direct child of the root / of the layers' parent (``vae``, ``model.wte``, ``lm_head`` ...)."""
    parent_name = layers_prefix.rpartition(".")[0]
    units: list[str] = []
    layers = _get(model, layers_prefix)
    parent = _get(model, parent_name) if parent_name else model
    for name, child in model.named_children():
        if parent_name and name == parent_name.split(".")[0] and parent is not None and layers is not None:
            for sub_name, sub in parent.named_children():
                full = f"{parent_name}.{sub_name}"
                if full == layers_prefix:
                    units.extend(f"{layers_prefix}.{i}" for i in range(len(layers)))
                elif _has_tensors(sub):
                    units.append(full)
            if any(True for _ in parent.parameters(recurse=False)) or any(True for _ in parent.buffers(recurse=False)):
                raise DeviceMapError(f"{parent_name} holds tensors directly; cannot map it by children")
        elif _has_tensors(child):
            units.append(name)
    return units


def manual_device_map(model: nn.Module, gpu_layers: int, device: int | str = 0,
                      layers_prefix: str = LAYERS_PREFIX, idle_on_cpu: bool = False) -> dict[str, int | str]:
    """The community loaders' "optimal device map" from N: every non-layer module and layers ``0..N-1`` on ``device``,
    the other layers on the CPU (``idle_on_cpu`` also sends :data:`IDLE_MODULES` there)."""
    if gpu_layers < 0:
        raise ValueError(f"gpu_layers must be >= 0, got {gpu_layers}")
    device_map: dict[str, int | str] = {}
    for unit in top_level_units(model, layers_prefix):
        index = _layer_index(unit, layers_prefix)
        if index is not None:
            device_map[unit] = device if index < gpu_layers else "cpu"
        elif idle_on_cpu and unit.split(".")[0] in IDLE_MODULES:
            device_map[unit] = "cpu"
        else:
            device_map[unit] = device
    validate_device_map(device_map, model)
    return device_map


def validate_device_map(device_map: Mapping[str, int | str], model: nn.Module) -> None:
    """Every parameter and buffer must be covered by exactly one key; keys must name real modules.

    Raises :class:`DeviceMapError` naming the missing modules (grouped: ``model.layers.24``, not its 30
    tensors), the keys that name nothing, and overlapping keys.
    """
    module_names = {name for name, _ in model.named_modules()}
    unknown = [k for k in device_map if k != "" and k not in module_names]
    keys = sorted(device_map, key=len)
    overlaps = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if _covers(a, b)]
    tensor_names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    missing_tensors = [n for n in tensor_names if not any(_covers(k, n) for k in device_map)]
    problems = []
    if missing_tensors:
        problems.append("not placed: " + ", ".join(_group_missing(missing_tensors, model)))
    if unknown:
        problems.append("keys that name no module: " + ", ".join(unknown[:10]))
    if overlaps:
        problems.append("overlapping keys: " + ", ".join(f"{a} / {b}" for a, b in overlaps[:5]))
    if problems:
        raise DeviceMapError("invalid device map - " + "; ".join(problems)
                             + ". Generate it with manual_device_map(model, gpu_layers=N) or add the missing entries.")


def _covers(key: str, name: str) -> bool:
    return key == "" or name == key or name.startswith(key + ".")


def _group_missing(tensor_names: Sequence[str], model: nn.Module) -> list[str]:
    """Smallest set of module names that together hold exactly the missing tensors."""
    missing = set(tensor_names)
    groups: list[str] = []
    taken: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(g + ".") for g in groups):
            continue
        owned = {f"{name}.{n}" for n, _ in module.named_parameters()} | {f"{name}.{n}" for n, _ in module.named_buffers()}
        if owned and owned <= missing:
            groups.append(name)
            taken |= owned
    groups.extend(sorted(missing - taken))
    return groups


# ------------------------------------------------------------------------ planning for bitsandbytes


@dataclass
class QuantizedPlan:
    """A map for bitsandbytes + what it costs."""

    device_map: dict[str, int | str]
    gpu_bytes: int
    cpu_bytes: int
    needs_fp32_cpu_offload: bool
    float_layers_on_cpu: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def unit_bytes(model: nn.Module, units: Sequence[str], quantized: Callable[[str], bool], bytes_per_param: float) -> dict[str, int]:
    """Size of each unit after loading: quantized Linear weights at ``bytes_per_param``, the rest as stored."""
    sizes = {u: 0 for u in units}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        unit = next((u for u in units if _covers(u, name)), None)
        if unit is None:
            continue
        module_name = name.rpartition(".")[0]
        if name.endswith(".weight") and quantized(module_name):
            sizes[unit] += int(t.numel() * bytes_per_param)
        else:
            sizes[unit] += t.numel() * t.element_size()
    return sizes


def plan_quantized_map(model: nn.Module, budget_bytes: int, quantized: Callable[[str], bool], bytes_per_param: float,
                       device: int | str = 0, compute_dtype_bytes: int = 2,
                       layers_prefix: str = LAYERS_PREFIX) -> QuantizedPlan:
    """Fit the model into ``budget_bytes`` of VRAM without putting a quantized layer on the CPU.

    Order of eviction: idle float modules (vision tower, aligner, lm_head, VAE), then decoder layers from
    the last one down. A decoder layer on the CPU is kept unquantized (``llm_int8_enable_fp32_cpu_offload``),
    so it costs ``compute_dtype_bytes`` per parameter of RAM, and accelerate moves it per step.
    """
    units = top_level_units(model, layers_prefix)
    sizes = unit_bytes(model, units, quantized, bytes_per_param)
    device_map: dict[str, int | str] = {u: device for u in units}
    gpu = sum(sizes.values())
    notes: list[str] = []
    float_layers: list[str] = []
    if gpu > budget_bytes:
        for unit in units:
            if unit.split(".")[0] in IDLE_MODULES and gpu > budget_bytes:
                device_map[unit] = "cpu"
                gpu -= sizes[unit]
                notes.append(f"{unit} ({sizes[unit] / GB:.2f} GB, float) -> CPU")
    if gpu > budget_bytes:
        layer_units = [u for u in units if _layer_index(u, layers_prefix) is not None]
        for unit in reversed(layer_units):
            if gpu <= budget_bytes:
                break
            device_map[unit] = "cpu"
            gpu -= sizes[unit]
            float_layers.append(unit)
        if float_layers:
            notes.append(f"{len(float_layers)} decoder layers do not fit the budget: they stay unquantized on the "
                         "CPU (bitsandbytes cannot offload quantized layers) - raise the budget or use NF4")
    if gpu > budget_bytes:
        notes.append(f"even with every decoder layer on the CPU, {gpu / GB:.2f} GB remain on the GPU "
                     f"(budget {budget_bytes / GB:.2f} GB)")
    cpu_bytes = 0
    for unit, dev in device_map.items():
        if dev == "cpu":
            cpu_bytes += sizes[unit]
            if unit in float_layers:  # unquantized on the CPU: bytes at compute precision
                cpu_bytes += _float_extra(model, unit, quantized, bytes_per_param, compute_dtype_bytes)
    validate_device_map(device_map, model)
    return QuantizedPlan(device_map, gpu, cpu_bytes, any(d == "cpu" for d in device_map.values()), float_layers, notes)


def _float_extra(model, unit, quantized, bytes_per_param, dtype_bytes) -> int:
    extra = 0
    for name, p in _get(model, unit).named_parameters():
        if name.endswith("weight") and quantized(f"{unit}.{name.rpartition('.')[0]}".rstrip(".")):
            extra += int(p.numel() * (dtype_bytes - bytes_per_param))
    return extra


# ------------------------------------------------------------------------------ after loading


@dataclass
class PlacementSummary:
    """Where a loaded model's weights are: bytes and units per device (a report, not a plan to execute;
    memory/planner.PlacementPlan is the plan)."""

    devices: dict[str, int] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # unit -> device
    offloaded_by: str = "none"  # none | accelerate | headroom-streaming | headroom-multi-device

    def __str__(self) -> str:
        parts = ", ".join(f"{dev}: {b / GB:.2f} GB" for dev, b in sorted(self.devices.items()))
        cpu_units = [u for u, d in self.units.items() if d == "cpu"]
        tail = f"; on CPU: {_summarize(cpu_units)}" if cpu_units else ""
        return f"placement: {parts}{tail} (offload: {self.offloaded_by})"

    def as_dict(self) -> dict:
        return {"devices": dict(self.devices), "units": dict(self.units), "offloaded_by": self.offloaded_by}


def describe_placement(model: nn.Module, layers_prefix: str = LAYERS_PREFIX) -> PlacementSummary:
    """Where each unit's tensors are now (accelerate-offloaded tensors are on "meta": counted as CPU)."""
    summary = PlacementSummary()
    hf_map = getattr(model, "hf_device_map", None) or {}
    try:
        units = top_level_units(model, layers_prefix)
    except DeviceMapError:
        units = [n for n, _ in model.named_children()]
    for unit in units:
        module = _get(model, unit)
        devices: dict[str, int] = {}
        for t in list(module.parameters()) + list(module.buffers()):
            dev = t.device.type if t.device.type != "cuda" else f"cuda:{t.device.index}"
            if dev == "meta":
                dev = "cpu"
            devices[dev] = devices.get(dev, 0) + t.numel() * t.element_size()
        for dev, b in devices.items():
            summary.devices[dev] = summary.devices.get(dev, 0) + b
        if devices:
            summary.units[unit] = max(devices, key=devices.get)
    if any(str(v) in ("cpu", "disk") for v in hf_map.values()) and len(set(map(str, hf_map.values()))) > 1:
        summary.offloaded_by = "accelerate"
    return summary


def _summarize(units: Sequence[str]) -> str:
    layers = [u for u in units if _layer_index(u, LAYERS_PREFIX) is not None]
    others = [u for u in units if u not in layers]
    text = ", ".join(others)
    if layers:
        idx = sorted(_layer_index(u, LAYERS_PREFIX) for u in layers)
        text += (", " if text else "") + f"{len(layers)} layers ({idx[0]}..{idx[-1]})"
    return text


def _layer_index(unit: str, layers_prefix: str) -> int | None:
    m = re.fullmatch(re.escape(layers_prefix) + r"\.(\d+)", unit)
    return int(m.group(1)) if m else None


def _get(model: nn.Module, path: str):
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# ------------------------------------------------------------------------------ BF16 streaming, low RAM


def bf16_stream_map(model: nn.Module, budget_bytes: int, device: int | str = 0, prefetch: int = 1,
                    layers_prefix: str = LAYERS_PREFIX, gpu_layers: int | None = None) -> tuple[dict, int]:
    """A map for loading a BF16 model that will be block-streamed: every non-layer unit and the first N
    decoder layers on ``device``, the other layers on the CPU. N fits the budget with room for the streaming
    ring (``prefetch + 1`` slots of one layer), unless ``gpu_layers`` fixes it. Returns (map, N)."""
    units = top_level_units(model, layers_prefix)
    sizes = unit_bytes(model, units, lambda n: False, 0.0)
    layers = [u for u in units if _layer_index(u, layers_prefix) is not None]
    rest = sum(b for u, b in sizes.items() if u not in layers)
    if gpu_layers is None:
        ring = (prefetch + 1) * max((sizes[u] for u in layers), default=0)
        room = budget_bytes - rest - ring
        gpu_layers = 0
        for unit in layers:
            if room < sizes[unit]:
                break
            room -= sizes[unit]
            gpu_layers += 1
    device_map = {u: (device if u not in layers or _layer_index(u, layers_prefix) < gpu_layers else "cpu") for u in units}
    validate_device_map(device_map, model)
    return device_map, gpu_layers


def undo_accelerate_offload(model: nn.Module) -> int:
    """Turn accelerate's CPU offload back into plain CPU tensors and remove its hooks.

    ``from_pretrained`` with CPU entries in the map loads those weights into RAM, then accelerate's dispatch
    swaps the modules' parameters for "meta" placeholders and keeps the real tensors in its hooks'
    ``weights_map`` (moved to the GPU synchronously at every forward). We take the tensors back - no copy -
    so our block streaming can own them. Returns how many tensors were put back; raises if any stays meta.
    """
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    restored = 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
        for h in hooks:
            weights_map = getattr(h, "weights_map", None)
            if not getattr(h, "offload", False) or weights_map is None:
                continue
            recurse = bool(getattr(h, "place_submodules", False))
            names = [n for n, t in list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
                     if t.device.type == "meta"]
            for name in names:
                set_module_tensor_to_device(module, name, "cpu", value=weights_map[name])
                restored += 1
    remove_hook_from_module(model, recurse=True)
    for name in ("to", "cuda", "xpu", "npu", "mlu", "musa", "half", "float"):  # dispatch's warning wrappers
        model.__dict__.pop(name, None)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"accelerate offload could not be undone for {len(left)} tensors, e.g. {left[:3]}")
    return restored
