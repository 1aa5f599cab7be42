"""Budget planner: which blocks live on which GPU, which are streamed from pinned RAM, which from disk.

The plan is data (print it, test it, ``as_dict()`` it); :func:`enable_block_streaming` executes it.

Rules:

* "The rest" (everything that is not a block: embeddings, norms, final layer, VAE ...) is resident. Units
  registered before the blocks go with the first block's device, the others with the last block's device
  (the device that runs the tail of the chain) - critical layers stay with the blocks that use them.
* Blocks that a ``critical`` pattern names are never streamed. The patterns are the caller's (its skip list, say):
  memory knows no model family's names, so by default no block is critical.
* Devices are filled in order with consecutive blocks; what fits nowhere is streamed from pinned host memory
  onto the device that runs the end of the chain, which also holds the ring of ``prefetch + 1`` GPU slots
  (each as large as the largest streamed block).
* ``blocks_resident=N`` caps the resident blocks (seed 002's ``blocks_in_memory``); None = as many as fit.
* ``order="spread"`` (default, one device): the streamed blocks are spread evenly between the resident ones
  (resident 0, 2, 4 ... at 50 %), so every copy overlaps the compute of the blocks before it and a step costs
  about max(compute, streamed bytes / PCIe bandwidth). ``order="first"`` keeps the first blocks resident and
  streams the tail (seed 000's device map); several devices always fill in order.
* Third tier (``ram_budget_bytes``): the streamed blocks that do not fit in that much host RAM are read from
  their safetensors file on every step (:mod:`.disk`). The RAM budget holds the pinned streamed blocks plus the
  disk read ring (``prefetch + 1`` buffers as large as the largest disk block); the blocks kept in RAM are
  spread among the streamed ones, so every disk read overlaps the copies and compute of other blocks.
  None (default): no RAM limit, nothing on disk. :func:`default_ram_budget_bytes`: what the machine can spare.
* Default budget per device: 55 % of its total VRAM (seed 000). A budget above the card is clamped to the
  card; a single-device budget below what the critical parts need is raised to that minimum; both with a
  warning that says what was done. Several budgets whose sum is below the critical need are an error.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..quant.skip import matching_pattern
from ..units import GB
from .blocks import resolve_blocks
from .tensors import module_bytes, tensor_nbytes

log = logging.getLogger("comfyui_headroom")

DEFAULT_BUDGET_FRACTION = 0.55
DEFAULT_PREFETCH = 2  # blocks copied ahead: a ring of 3 slots absorbs jitter when copy ~ compute
ORDERS = ("spread", "first")
STREAMED = "pinned"  # the location name of streamed blocks
ON_DISK = "disk"  # the location name of blocks read from their file on every step
RAM_RESERVE_BYTES = 6 * GB  # default RAM budget leaves this + RAM_RESERVE_FRACTION of the total to the OS and ComfyUI
RAM_RESERVE_FRACTION = 0.10


class PlanError(ValueError):
    """The budgets cannot hold what must be resident (message names the numbers)."""


def default_budget_bytes(total_bytes: int, fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """Seed 000: give the weights 55 % of the card, leave the rest for inference. ``fraction`` in (0, 1]."""
    _nbytes("total VRAM", total_bytes, positive=True)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"budget fraction {fraction!r}: expected a number above 0 and at most 1 (0.55 = 55 % of the "
                         "card)")
    return int(total_bytes * fraction)


def default_ram_budget_bytes(available_bytes: int | None = None, total_bytes: int | None = None) -> int:
    """Host RAM the streamed blocks may use by default: what is available now (psutil) minus room for the OS,
    ComfyUI and the model's other parts (6 GB + 10 % of the total); never below 0."""
    if available_bytes is None or total_bytes is None:
        import psutil

        memory = psutil.virtual_memory()
        available_bytes = memory.available if available_bytes is None else available_bytes
        total_bytes = memory.total if total_bytes is None else total_bytes
    available = _nbytes("available RAM", available_bytes)
    total = _nbytes("total RAM", total_bytes, positive=True)
    return max(0, available - RAM_RESERVE_BYTES - int(RAM_RESERVE_FRACTION * total))


def _nbytes(what: str, value, positive: bool = False) -> int:
    """``value`` as a whole number of bytes; PlanError (a ValueError) naming ``what`` for NaN, inf, a negative
    number (zero too when ``positive``) or something that is not a number."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and \
        (value > 0 if positive else value >= 0)
    if not ok:
        raise PlanError(f"{what} is {value!r}; expected a number of bytes {'> 0' if positive else '>= 0'}")
    return int(value)


def _whole(what: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be a whole number >= {low}, got {value!r}")
    return int(value)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def _device_name(dev) -> str:
    if isinstance(dev, int):
        return f"cuda:{dev}"
    text = str(dev)
    return "cuda:0" if text == "cuda" else text


@dataclass
class Unit:
    name: str
    bytes: int
    kind: str  # "block" | "head" | "tail"
    critical: bool = False


@dataclass
class DevicePlacement:
    device: str
    budget_bytes: int
    modules: list[tuple[str, int]] = field(default_factory=list)
    ring_bytes: int = 0

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.modules) + self.ring_bytes


@dataclass
class PlacementPlan:
    devices: list[DevicePlacement]
    streamed: list[tuple[str, int]]
    stream_device: str | None
    ring_slots: int
    block_names: list[str]
    units: list[Unit]
    warnings: list[str] = field(default_factory=list)
    disk: list[tuple[str, int]] = field(default_factory=list)  # the streamed blocks read from their file
    ram_budget_bytes: int | None = None
    disk_slots: int = 0  # pinned read buffers of the disk tier
    disk_ring_bytes: int = 0

    @property
    def streamed_bytes(self) -> int:
        """Bytes of every streamed block, from pinned RAM or from disk (what crosses PCIe per step)."""
        return sum(b for _, b in self.streamed)

    @property
    def disk_bytes(self) -> int:
        """Bytes read from disk per pass over the blocks."""
        return sum(b for _, b in self.disk)

    @property
    def pinned_bytes(self) -> int:
        return self.streamed_bytes - self.disk_bytes

    @property
    def ram_bytes(self) -> int:
        """Host RAM the streamed blocks take: pinned blocks + the disk read ring."""
        return self.pinned_bytes + self.disk_ring_bytes

    def device_of(self, name: str) -> str:
        """Device holding module ``name`` (``"pinned"`` for streamed blocks in RAM, ``"disk"`` for those read
        from their file)."""
        for dp in self.devices:
            if any(n == name for n, _ in dp.modules):
                return dp.device
        if any(n == name for n, _ in self.disk):
            return ON_DISK
        if any(n == name for n, _ in self.streamed):
            return STREAMED
        raise KeyError(name)

    def disk_blocks(self) -> list[str]:
        return [n for n, _ in self.disk]

    def pinned_blocks(self) -> list[str]:
        on_disk = set(self.disk_blocks())
        return [n for n, _ in self.streamed if n not in on_disk]

    def tier_counts(self) -> dict[str, int]:
        """Blocks per tier: ``{"gpu": .., "ram": .., "disk": ..}``."""
        return {"gpu": len(self.resident_blocks()), "ram": len(self.pinned_blocks()), "disk": len(self.disk)}

    def resident_blocks(self, device: str | None = None) -> list[str]:
        blocks = set(self.block_names)
        return [n for dp in self.devices if device is None or dp.device == _device_name(device)
                for n, _ in dp.modules if n in blocks]

    def streamed_blocks(self) -> list[str]:
        return [n for n, _ in self.streamed]

    def as_dict(self) -> dict:
        return {
            "devices": [{"device": dp.device, "budget_bytes": dp.budget_bytes, "bytes": dp.bytes,
                         "ring_bytes": dp.ring_bytes, "modules": [list(m) for m in dp.modules]} for dp in self.devices],
            "streamed": [list(m) for m in self.streamed],
            "streamed_bytes": self.streamed_bytes,
            "stream_device": self.stream_device,
            "ring_slots": self.ring_slots,
            "disk": [list(m) for m in self.disk],
            "disk_bytes": self.disk_bytes,
            "ram_budget_bytes": self.ram_budget_bytes,
            "ram_bytes": self.ram_bytes,
            "disk_slots": self.disk_slots,
            "disk_ring_bytes": self.disk_ring_bytes,
            "tiers": self.tier_counts(),
            "warnings": list(self.warnings),
        }

    def __str__(self) -> str:
        n_blocks = len(self.block_names)
        lines = []
        for dp in self.devices:
            blocks = [n for n, _ in dp.modules if n in set(self.block_names)]
            others = [n for n, _ in dp.modules if n not in set(self.block_names)]
            ring = f", ring {self.ring_slots} x slot = {_gb(dp.ring_bytes)}" if dp.ring_bytes else ""
            lines.append(f"{dp.device}: {_gb(dp.bytes)} of {_gb(dp.budget_bytes)} budget - {len(blocks)}/{n_blocks} "
                         f"blocks{_span(blocks)}, {len(others)} other modules{ring}")
        if self.streamed and self.disk:
            pinned = self.pinned_blocks()
            lines.append(f"streamed from pinned RAM onto {self.stream_device}: {len(pinned)} blocks{_span(pinned)}, "
                         f"{_gb(self.pinned_bytes)}")
            lines.append(f"streamed from disk onto {self.stream_device}: {len(self.disk)} blocks"
                         f"{_span(self.disk_blocks())}, {_gb(self.disk_bytes)} read per step through "
                         f"{self.disk_slots} pinned buffers ({_gb(self.disk_ring_bytes)}); RAM "
                         f"{_gb(self.ram_bytes)} of {_gb(self.ram_budget_bytes or 0)} budget")
        elif self.streamed:
            lines.append(f"streamed from pinned RAM onto {self.stream_device}: {len(self.streamed)} blocks"
                         f"{_span([n for n, _ in self.streamed])}, {_gb(self.streamed_bytes)}")
        else:
            lines.append("streamed: none")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _span(names: list[str]) -> str:
    if not names:
        return ""
    return f" ({names[0]})" if len(names) == 1 else f" ({names[0]} .. {names[-1]})"


def _own_bytes(mod: nn.Module) -> int:
    total = 0
    for t in list(mod._parameters.values()) + list(mod._buffers.values()):
        if t is not None:
            total += tensor_nbytes(t)
            qs = t.__dict__.get("quant_state") if isinstance(t.__dict__, dict) else None
            if qs is not None:  # bitsandbytes 4-bit: count its quant state too
                for attr in ("absmax", "code", "offset"):
                    v = getattr(qs, attr, None)
                    total += tensor_nbytes(v) if hasattr(v, "element_size") else 0
    return total


def collect_units(model: nn.Module | None, block_names: list[str], block_mods: list[nn.Module],
                  critical: Sequence[str]) -> list[Unit]:
    """Blocks plus the rest of the model grouped into the largest sub-modules that contain no block."""
    units: list[Unit] = []
    block_ids = {id(m): n for n, m in zip(block_names, block_mods)}
    if model is None:
        return [Unit(n, module_bytes(m), "block", matching_pattern(n, critical) is not None)
                for n, m in zip(block_names, block_mods)]
    ancestors = set()
    for name in block_names:
        parts = name.split(".")
        ancestors.update(".".join(parts[:i]) for i in range(len(parts)))
    seen_block = False

    def visit(prefix: str, mod: nn.Module) -> None:
        nonlocal seen_block
        if id(mod) in block_ids:
            seen_block = True
            units.append(Unit(block_ids[id(mod)], module_bytes(mod), "block",
                              matching_pattern(block_ids[id(mod)], critical) is not None))
            return
        if prefix in ancestors:
            own = _own_bytes(mod)
            if own:
                units.append(Unit(prefix or "(root)", own, "tail" if seen_block else "head",
                                  matching_pattern(prefix, critical) is not None))
            for child_name, child in mod.named_children():
                visit(f"{prefix}.{child_name}" if prefix else child_name, child)
            return
        size = module_bytes(mod)
        if size:
            units.append(Unit(prefix, size, "tail" if seen_block else "head", matching_pattern(prefix, critical) is not None))

    visit("", model)
    return units


def _normalise_budgets(budgets, devices, device_totals) -> tuple[list[str], list[int]]:
    totals = device_totals
    if isinstance(budgets, dict):
        names = [_device_name(d) for d in budgets]
        values = list(budgets.values())
        if devices is not None and [_device_name(d) for d in devices] != names:
            raise PlanError(f"budgets name devices {names} but devices={[_device_name(d) for d in devices]}")
        return names, [_nbytes(f"the budget of {n}", v) for n, v in zip(names, values)]
    names = [_device_name(d) for d in (devices if devices is not None else
                                       (list(totals) if isinstance(totals, dict) else ["cuda:0"]))]
    if budgets is None:
        if totals is None:
            raise PlanError("no budget and no device_totals: pass budgets (bytes) or device_totals "
                            "(total VRAM per device, e.g. from torch.cuda.mem_get_info) for the 55 % default")
        tot = _totals_list(totals, names)
        return names, [default_budget_bytes(t) for t in tot]
    if isinstance(budgets, (list, tuple)):
        if len(budgets) != len(names):
            raise PlanError(f"{len(budgets)} budgets given for {len(names)} devices {names}: pass one budget per device")
        return names, [_nbytes(f"the budget of {n}", b) for n, b in zip(names, budgets)]
    return names, [_nbytes(f"the budget of {n}", budgets) for n in names]


def _totals_list(totals, names: list[str]) -> list[int] | None:
    if totals is None:
        return None
    if isinstance(totals, dict):
        norm = {_device_name(k): _nbytes(f"device_totals[{k!r}]", v, positive=True) for k, v in totals.items()}
        missing = [n for n in names if n not in norm]
        if missing:
            raise PlanError(f"device_totals has no entry for {missing}")
        return [norm[n] for n in names]
    if isinstance(totals, (list, tuple)):
        if len(totals) != len(names):
            raise PlanError(f"{len(totals)} device totals for {len(names)} devices")
        return [_nbytes(f"the total of {n}", t, positive=True) for n, t in zip(names, totals)]
    return [_nbytes(f"the total of {n}", totals, positive=True) for n in names]


def plan_placement(model_or_blocks, budgets=None, critical: Sequence[str] = (),
                   blocks_resident: int | None = None, *, blocks=None, devices: Sequence | None = None,
                   device_totals=None, prefetch: int = DEFAULT_PREFETCH, order: str = "spread",
                   ram_budget_bytes: int | None = None) -> PlacementPlan:
    """Plan where every module lives under per-device budgets (bytes). See the module docstring.

    ``budgets``: ``{device: bytes}``, a list aligned with ``devices``, one number (each device), or None
    (55 % of ``device_totals``). ``device_totals``: total VRAM per device (dict, list or one number) -
    used for the default budget and for clamping budgets above the card. ``prefetch``: blocks copied
    ahead (ring of ``prefetch + 1`` slots). ``order``: "spread" or "first" (module docstring). ``critical``:
    the caller's substring patterns; a block they name is never streamed, a unit they name is flagged critical.
    ``ram_budget_bytes``: host RAM for the streamed blocks; those that do not fit are read from disk (module
    docstring); None = no limit.
    """
    _whole("prefetch", prefetch, 1)
    if ram_budget_bytes is not None:
        ram_budget_bytes = _nbytes("ram_budget_bytes", ram_budget_bytes)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if blocks_resident is not None:
        _whole("blocks_resident", blocks_resident, 0)
    model, block_names, block_mods = resolve_blocks(model_or_blocks, blocks)
    units = collect_units(model, block_names, block_mods, critical)
    names, budget_list = _normalise_budgets(budgets, devices, device_totals)
    totals = _totals_list(device_totals, names)
    warnings: list[str] = []

    blocks = [u for u in units if u.kind == "block"]
    head = [u for u in units if u.kind == "head"]
    tail = [u for u in units if u.kind == "tail"]
    forced = [u for u in blocks if u.critical]
    optional = [u for u in blocks if not u.critical]
    slots = prefetch + 1
    max_optional = max((u.bytes for u in optional), default=0)
    ring_min = slots * max_optional if optional else 0
    need = sum(u.bytes for u in head + tail + forced)

    if totals is not None:
        for i, (name, total) in enumerate(zip(names, totals)):
            if budget_list[i] > total:
                warnings.append(f"{name}: budget {_gb(budget_list[i])} is above the card's {_gb(total)}; "
                                f"clamped to {_gb(total)}")
                budget_list[i] = total
    if len(names) == 1:
        minimum = need + (ring_min if optional and (blocks_resident is not None and blocks_resident < len(blocks)
                                                     or sum(u.bytes for u in blocks) + need > budget_list[0]) else 0)
        if budget_list[0] < minimum:
            if totals is not None and minimum > totals[0]:
                raise PlanError(f"{names[0]}: the critical parts need {_gb(minimum)} (rest {_gb(need - sum(u.bytes for u in forced))}"
                                f", critical blocks {_gb(sum(u.bytes for u in forced))}, ring {_gb(ring_min)}) but the card has "
                                f"{_gb(totals[0])}")
            warnings.append(f"{names[0]}: budget {_gb(budget_list[0])} is below the {_gb(minimum)} the critical "
                            f"parts need (non-block modules, critical blocks, streaming ring); raised to {_gb(minimum)}")
            budget_list[0] = minimum
    elif sum(budget_list) < need:
        raise PlanError(f"budgets {[_gb(b) for b in budget_list]} for {names} sum to {_gb(sum(budget_list))}, below the "
                        f"{_gb(need)} that must be resident (non-block modules {_gb(need - sum(u.bytes for u in forced))}, "
                        f"critical blocks {_gb(sum(u.bytes for u in forced))})")

    limit = len(blocks) if blocks_resident is None else blocks_resident
    if len(forced) > limit:
        warnings.append(f"{len(forced)} blocks are critical and stay resident although blocks_resident={limit}")
    streamed: set[str] = set()
    budget_left = limit - len(forced)
    for u in optional:  # the first blocks stay resident, the last ones are streamed
        if budget_left > 0:
            budget_left -= 1
        else:
            streamed.add(u.name)

    while True:
        result = _try_place(names, budget_list, head, tail, blocks, streamed, slots)
        if isinstance(result, PlacementPlan) and order == "spread" and len(names) == 1 and streamed:
            result = _spread(names, budget_list, head, tail, blocks, optional, streamed, slots, result)
        if isinstance(result, PlacementPlan):
            result.block_names = block_names
            result.units = units
            result.warnings = warnings
            if ram_budget_bytes is not None:
                _place_on_disk(result, ram_budget_bytes, slots)
            for w in warnings:
                log.warning("headroom plan: %s", w)
            return result
        resident_optional = [u for u in optional if u.name not in streamed]
        if not resident_optional:
            raise PlanError(f"cannot place the model: {result}; budgets {dict(zip(names, map(_gb, budget_list)))}, "
                            f"resident need {_gb(need)}, streaming ring {_gb(ring_min)}")
        streamed.add(resident_optional[-1].name)


def _place_on_disk(plan: PlacementPlan, ram_budget: int, slots: int) -> None:
    """Keep as many streamed blocks in pinned RAM as the RAM budget holds next to the disk read ring, spread
    among the streamed ones; the others go on disk. PlanError when not even the ring fits."""
    plan.ram_budget_bytes = ram_budget
    streamed = plan.streamed
    if sum(b for _, b in streamed) <= ram_budget:
        return
    for keep in range(len(streamed) - 1, -1, -1):
        kept = set(spread_positions(len(streamed), keep))
        disk = [s for i, s in enumerate(streamed) if i not in kept]
        buffers = min(slots, len(disk))
        ring = buffers * max(b for _, b in disk)
        if sum(b for i, (_, b) in enumerate(streamed) if i in kept) + ring <= ram_budget:
            plan.disk, plan.disk_slots, plan.disk_ring_bytes = disk, buffers, ring
            return
    raise PlanError(f"RAM budget {_gb(ram_budget)} is below the disk read ring of {buffers} buffers x the largest "
                    f"block ({_gb(ring)}); give ram_budget_gb at least {ring / GB:.2f}, or lower prefetch")


def spread_positions(n: int, keep: int) -> list[int]:
    """``keep`` of ``n`` positions, evenly spaced, starting with 0 (0, 2, 4 ... for half)."""
    return sorted({(i * n) // keep for i in range(keep)}) if keep > 0 else []


def _spread(names, budget_list, head, tail, blocks, optional, streamed, slots, contiguous):
    """Same number of resident optional blocks, spread evenly; fewer if uneven block sizes overflow."""
    keep = len(optional) - len([u for u in optional if u.name in streamed])
    while keep >= 0:
        chosen = {optional[i].name for i in spread_positions(len(optional), keep)}
        trial = {u.name for u in optional if u.name not in chosen}
        result = _try_place(names, budget_list, head, tail, blocks, trial, slots)
        if isinstance(result, PlacementPlan):
            return result
        keep -= 1
    return contiguous


def _try_place(names, budget_list, head, tail, blocks, streamed, slots):
    """One greedy pass; returns a plan, or a string saying what did not fit."""
    placements = [DevicePlacement(n, b) for n, b in zip(names, budget_list)]
    used = [0] * len(names)

    def put(k: int, unit: Unit) -> None:
        placements[k].modules.append((unit.name, unit.bytes))
        used[k] += unit.bytes

    head_bytes = sum(u.bytes for u in head)
    k = 0
    last = None
    for u in blocks:
        if u.name in streamed:
            continue
        extra = head_bytes if last is None else 0  # the head goes with the first resident block
        while k < len(names) and used[k] + u.bytes + extra > budget_list[k]:
            k += 1
        if k == len(names):
            where = f"after {names[last]}" if last is not None else "(together with the modules before the blocks, " \
                                                                   f"{_gb(head_bytes)})"
            return f"block {u.name} ({_gb(u.bytes)}) fits on no device {where}"
        if last is None:
            for h in head:
                put(k, h)
        put(k, u)
        last = k
    if last is None:  # no resident block: everything runs on the first device
        last = 0
        if head_bytes > budget_list[0]:
            return f"{names[0]} cannot hold the modules before the blocks ({_gb(head_bytes)} > budget {_gb(budget_list[0])})"
        for h in head:
            put(0, h)
    stream_list = [(u.name, u.bytes) for u in blocks if u.name in streamed]
    ring = slots * max((b for _, b in stream_list), default=0) if stream_list else 0
    tail_bytes = sum(u.bytes for u in tail)
    if used[last] + ring + tail_bytes > budget_list[last]:
        return (f"{names[last]} cannot hold its blocks ({_gb(used[last])}) + ring ({_gb(ring)}) + modules after the "
                f"blocks ({_gb(tail_bytes)}) in {_gb(budget_list[last])}")
    for u in tail:
        put(last, u)
    placements[last].ring_bytes = ring
    return PlacementPlan(placements, stream_list, names[last] if stream_list else None, slots if stream_list else 0,
                         [], [])
