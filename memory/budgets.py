"""Per-GPU VRAM budgets from text (``gpu_budgets_gb="40,40"``), checked before anything is loaded.

* :func:`parse_gpu_budgets`: ``"40,40"`` -> ``{0: 40 GiB, 1: 40 GiB}`` in bytes; one number (``"24"``) is
  that budget on every GPU; ``0`` is 55 % of that card (needs its total). The caller says how many GPUs are
  present; a list of another length is an error naming both numbers.
* :func:`check_budgets_cover`: the sum must hold what has to be resident (the critical layers).
* :func:`plan_for_gpus`: the :class:`PlacementPlan` for those budgets (``cuda:0``, ``cuda:1`` ...), ready for
  :func:`enable_multi_device`; the planner's :class:`PlanError` names the numbers when they do not fit.
* :func:`parse_devices`: ``"cuda:0,cuda:1"`` -> the devices a model is split over (each must exist).
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Mapping, Sequence

import torch

from ..kernels.dispatch import check_device
from ..units import GB, MAX_GPU_GB
from .estimate import plain_number
from .planner import PlacementPlan, PlanError, default_budget_bytes, plan_placement

log = logging.getLogger("comfyui_headroom")

# Accepted budgets, GB per device: at least a megabyte and at most a terabyte - a larger number is a typo
# (or "inf"), not a budget. A budget above the card is clamped to the card, as the planner does.
MIN_BUDGET_GB = 0.001
MAX_BUDGET_GB = MAX_GPU_GB


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def _numbers(text, what: str, per: str) -> list[float]:
    """``"40,40"`` / ``"24"`` / ``24`` / ``[40, 40]`` -> floats; ValueError naming ``text`` for anything else
    (an empty field, a word, ``None``, ``True``)."""
    example = f"write GB per {per} like '40,40', or one number for every {per}"
    if isinstance(text, str):
        items = [p.strip() for p in text.replace(";", ",").split(",")]
        if any(p == "" for p in items):
            raise ValueError(f"{what}={text!r} has an empty field: expected numbers separated by commas; {example}")
    elif isinstance(text, numbers.Real) and not isinstance(text, bool):
        items = [text]
    elif isinstance(text, (list, tuple)) and text:
        items = list(text)
    else:
        raise ValueError(f"{what}={text!r}: expected numbers separated by commas; {example}")
    values = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            values.append(float(item))
        except (TypeError, ValueError):
            raise ValueError(f"{what}={text!r}: {items!r} are not all numbers ({item!r} is not); {example}") from None
    return values


def _check_budget(what: str, text, device: str, gb: float, total_bytes: int | None, zero_means: str | None) -> None:
    """ValueError naming ``device`` and the accepted range when ``gb`` is not a usable budget (NaN, inf, negative,
    zero unless ``zero_means`` says what 0 is, below a megabyte, above a terabyte); above the card is clamped later."""
    if math.isfinite(gb) and (MIN_BUDGET_GB <= gb <= MAX_BUDGET_GB or (gb == 0 and zero_means)):
        return
    card = f" (above the card's {_gb(total_bytes)} it is clamped to the card)" if total_bytes else ""
    accepted = f"{plain_number(MIN_BUDGET_GB)} to {plain_number(MAX_BUDGET_GB)} GB{card}" + \
        (f", or 0 = {zero_means}" if zero_means else "")
    raise ValueError(f"{what}={text!r}: the budget of {device} is {gb}; accepted: {accepted}")


def clamp_to_card(budget_bytes: int, total_bytes: int | None, what: str) -> int:
    """A budget above the card's total VRAM is clamped to the card, with a warning (nothing is left for inference)."""
    if total_bytes and budget_bytes > total_bytes:
        log.warning("%s: %.1f GB is above the card's %.1f GB; clamped to the card, which leaves no VRAM for inference "
                    "(0 = 55 %% of the card)", what, budget_bytes / GB, total_bytes / GB)
        return int(total_bytes)
    return budget_bytes


def _total_of(device_totals, index: int) -> int | None:
    """Total VRAM of GPU ``index`` from a list or mapping that may not name it (None: unknown)."""
    try:
        return None if device_totals is None else device_totals[index]
    except (IndexError, KeyError):
        return None


def parse_gpu_budgets(text, device_count: int, device_totals: Mapping[int, int] | Sequence[int] | None = None) -> dict[int, int]:
    """``{gpu index: budget bytes}`` from ``"40,40"`` / ``"24"`` / ``[40, 40]`` / ``24`` (GiB each).

    ``device_count``: GPUs present (``torch.cuda.device_count()``). ``device_totals``: total VRAM per GPU,
    needed for ``0`` (= 55 % of that card); a budget above a card is clamped to it (:func:`clamp_to_card`).
    Accepted per GPU: 0, or :data:`MIN_BUDGET_GB` to :data:`MAX_BUDGET_GB`.
    """
    if device_count < 1:
        raise ValueError(f"gpu_budgets_gb={text!r} needs at least one CUDA GPU, but {device_count} are present")
    values = _numbers(text, "gpu_budgets_gb", "GPU")
    if len(values) == 1 and device_count > 1:
        values = values * device_count
    if len(values) != device_count:
        raise ValueError(f"gpu_budgets_gb={text!r} gives {len(values)} budgets but {device_count} GPUs are present "
                         f"(cuda:0..cuda:{device_count - 1}): give one budget per GPU, or one number for all")
    budgets: dict[int, int] = {}
    for i, gb in enumerate(values):
        total = _total_of(device_totals, i)
        _check_budget("gpu_budgets_gb", text, f"cuda:{i}", gb, total, "55 % of the card")
        if gb > 0:
            budgets[i] = clamp_to_card(int(gb * GB), total, f"gpu_budgets_gb: cuda:{i} budget")
            continue
        if not total:
            raise ValueError(f"gpu_budgets_gb={text!r}: cuda:{i} budget 0 means 55 % of the card, but its total VRAM "
                             "is unknown; give the budget in GB")
        budgets[i] = default_budget_bytes(total)
    return budgets


def check_budgets_cover(budgets: Mapping[int, int], need_bytes: int, what: str = "the critical layers") -> None:
    """Raise :class:`PlanError` when the budgets together cannot hold ``need_bytes``."""
    total = sum(budgets.values())
    if total < need_bytes:
        per_gpu = ", ".join(f"cuda:{i} {_gb(b)}" for i, b in sorted(budgets.items()))
        raise PlanError(f"GPU budgets ({per_gpu}) sum to {_gb(total)}, below the {_gb(need_bytes)} that {what} need "
                        "on the GPUs: raise the budgets")


def plan_for_gpus(model, budgets: Mapping[int, int], *, blocks=None, critical: Sequence[str] = (),
                  device_totals: Mapping[int, int] | None = None) -> PlacementPlan:
    """The split of ``model`` over ``cuda:i`` under ``budgets`` (see :func:`plan_placement`)."""
    order = sorted(budgets)
    totals = None if device_totals is None else [device_totals[i] for i in order]
    return plan_placement(model, [budgets[i] for i in order], critical, blocks=blocks,
                          devices=[f"cuda:{i}" for i in order], device_totals=totals)


def parse_devices(text: str, device_count: int) -> list[str]:
    """``"cuda:0,cuda:1"`` (or ``"0,1"``) -> ``["cuda:0", "cuda:1"]``: two or more distinct devices, each present
    (``device_count`` CUDA GPUs); ``"cpu"`` entries are accepted (tests split over CPU "devices"). Empty -> []."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if not isinstance(text, str):
        raise ValueError(f"devices={text!r}: expected text such as 'cuda:0,cuda:1'")
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    if any(p == "" for p in parts):
        raise ValueError(f"devices={text!r} has an empty field: write devices separated by commas, e.g. 'cuda:0,cuda:1'")
    devices = []
    for part in parts:
        try:
            device = check_device(part, device_count)
        except ValueError as err:
            raise ValueError(f"devices={text!r}: {err}") from None
        devices.append("cpu" if device.type == "cpu" else f"cuda:{device.index or 0}")
    if len(devices) < 2:
        raise ValueError(f"devices={text!r}: a split needs two or more devices (one device: leave it empty)")
    gpus = [d for d in devices if d != "cpu"]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"devices={text!r} names a GPU twice ({', '.join(devices)})")
    return devices


def _cuda_totals(devices: Sequence[str]) -> list[int | None]:
    """Total VRAM of each ``cuda:N`` of ``devices`` that this machine has (None for the others)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    totals: list[int | None] = []
    for device in devices:
        index = device.removeprefix("cuda:")
        present = device.startswith("cuda:") and index.isdigit() and int(index) < count
        totals.append(torch.cuda.get_device_properties(int(index)).total_memory if present else None)
    return totals


def parse_device_budgets(text: str, devices: Sequence[str], device_totals: Sequence[int | None] | None = None
                         ) -> list[int] | None:
    """Budgets (bytes) for ``devices`` from ``"40,40"`` (GB each; one number = that on every device); empty ->
    None (split evenly by bytes). A list of another length, or a value that is not a usable budget (see
    :func:`parse_gpu_budgets`; 0 is not one here), is an error naming both. ``device_totals``: total VRAM per
    device (default: asked from CUDA for the GPUs this machine has) - a budget above the card is clamped to it."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    values = _numbers(text, "gpu_budgets_gb", "device")
    if len(values) == 1:
        values = values * len(devices)
    if len(values) != len(devices):
        raise ValueError(f"gpu_budgets_gb={text!r} gives {len(values)} budgets for {len(devices)} devices "
                         f"({', '.join(devices)}): give one per device, or one number for all")
    totals = list(device_totals) if device_totals is not None else _cuda_totals(devices)
    for i, (device, gb) in enumerate(zip(devices, values, strict=True)):
        _check_budget("gpu_budgets_gb", text, device, gb, _total_of(totals, i), None)
    return [clamp_to_card(int(gb * GB), _total_of(totals, i), f"gpu_budgets_gb: {device} budget")
            for i, (device, gb) in enumerate(zip(devices, values))]
