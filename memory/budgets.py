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

from typing import Mapping, Sequence

from ..units import GB
from .planner import PlacementPlan, PlanError, default_budget_bytes, plan_placement


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def parse_gpu_budgets(text, device_count: int, device_totals: Mapping[int, int] | Sequence[int] | None = None) -> dict[int, int]:
    """``{gpu index: budget bytes}`` from ``"40,40"`` / ``"24"`` / ``[40, 40]`` / ``24`` (GiB each).

    ``device_count``: GPUs present (``torch.cuda.device_count()``). ``device_totals``: total VRAM per GPU,
    needed only for ``0`` (= 55 % of that card).
    """
    if device_count < 1:
        raise ValueError(f"gpu_budgets_gb={text!r} needs at least one CUDA GPU, but {device_count} are present")
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(";", ",").split(",")]
        if not text.strip() or any(p == "" for p in parts):
            raise ValueError(f"gpu_budgets_gb={text!r}: expected numbers separated by commas, e.g. '40,40' "
                             "(GB per GPU) or '24' (the same on every GPU)")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"gpu_budgets_gb={text!r}: {parts!r} are not all numbers; write GB per GPU like "
                             "'40,40'") from None
    elif isinstance(text, (int, float)):
        values = [float(text)]
    else:
        values = [float(v) for v in text]
    if len(values) == 1 and device_count > 1:
        values = values * device_count
    if len(values) != device_count:
        raise ValueError(f"gpu_budgets_gb={text!r} gives {len(values)} budgets but {device_count} GPUs are present "
                         f"(cuda:0..cuda:{device_count - 1}): give one budget per GPU, or one number for all")
    budgets: dict[int, int] = {}
    for i, gb in enumerate(values):
        if gb < 0 or gb != gb:
            raise ValueError(f"gpu_budgets_gb={text!r}: budget of cuda:{i} is {gb}; it must be >= 0 (0 = 55 % of the card)")
        if gb > 0:
            budgets[i] = int(gb * GB)
            continue
        total = None if device_totals is None else device_totals[i]
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
    parts = [p.strip().lower() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return []
    devices = []
    for part in parts:
        name = f"cuda:{part}" if part.isdigit() else part
        if name != "cpu":
            index = name.removeprefix("cuda:")
            if not name.startswith("cuda:") or not index.isdigit():
                raise ValueError(f"devices={text!r}: {part!r} is not a device; write e.g. 'cuda:0,cuda:1'")
            if int(index) >= device_count:
                raise ValueError(f"devices={text!r}: {name} does not exist ({device_count} CUDA GPU(s) present: "
                                 f"cuda:0..cuda:{device_count - 1})" if device_count else
                                 f"devices={text!r}: {name} does not exist (no CUDA GPU is present)")
        devices.append(name)
    if len(devices) < 2:
        raise ValueError(f"devices={text!r}: a split needs two or more devices (one device: leave it empty)")
    if len(set(devices) - {"cpu"}) != len([d for d in devices if d != "cpu"]):
        raise ValueError(f"devices={text!r} names a GPU twice")
    return devices


def parse_device_budgets(text: str, devices: Sequence[str]) -> list[int] | None:
    """Budgets (bytes) for ``devices`` from ``"40,40"`` (GB each; one number = that on every device); empty ->
    None (split evenly by bytes). A list of another length, or a value <= 0, is an error naming both."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"gpu_budgets_gb={text!r}: {parts!r} are not all numbers; write GB per device like "
                         "'40,40'") from None
    if len(values) == 1:
        values = values * len(devices)
    if len(values) != len(devices):
        raise ValueError(f"gpu_budgets_gb={text!r} gives {len(values)} budgets for {len(devices)} devices "
                         f"({', '.join(devices)}): give one per device, or one number for all")
    for device, gb in zip(devices, values):
        if not gb > 0:
            raise ValueError(f"gpu_budgets_gb={text!r}: the budget of {device} is {gb}; it must be > 0 GB")
    return [int(gb * GB) for gb in values]
