"""Run one model split across several devices (issue #9): each block lives on one device, inputs follow it.

Entry point: :func:`enable_multi_device` -> :class:`MultiDeviceSplit` (``.disable()`` undoes it).

* Where things go comes from a :class:`PlacementPlan` (:func:`plan_placement` with several devices: blocks
  fill the devices in order, the modules before the blocks go with the first block, the ones after with the
  last) or, given only a list of devices, from an even split of the blocks by bytes (same head/tail rule).
* A forward pre-hook on every block and every placed non-block module moves its inputs - positional and
  keyword tensors, also inside tuples, lists and dicts (activations, timestep embedding, conditioning,
  rotary ``position_embeddings``, masks) - to that module's device with ``non_blocking=True``. A forward
  hook on the model moves its output to ``output_device`` (default: the first device).
* On CUDA each placed module's pre-hook also makes its device the current one (Triton kernels and
  ``device="cuda"`` scratch follow the current device); the caller's current device is restored after the
  model's forward, also when it raises.
* Same device twice (``["cpu", "cpu"]``) is allowed: the code path (placement, hooks, moves) runs exactly as
  on two GPUs, which is how the CPU tests exercise it.

* A plan that also streams blocks (what fits on no device: :attr:`PlacementPlan.streamed`) runs them on the
  plan's ``stream_device`` through a :class:`BlockStreamer` over that device's blocks: pinned host memory, a
  ring of ``plan.ring_slots`` GPU slots, copies on that device's own stream, prefetched while the blocks
  before them run.

Limits (documented in docs/multi_gpu.md): code in a parent module's own ``forward`` that mixes tensors from
modules on different devices outside any placed module (e.g. ``h * self.scale`` after the blocks, with
``scale`` on the first device) is not rewritten - hooks act at module boundaries only; inference only; a
model already streaming through :func:`enable_block_streaming` cannot be split (the split streams by itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .blocks import resolve_blocks
from .planner import PlacementPlan, collect_units

log = logging.getLogger("comfyui_headroom")

_ATTR = "_headroom_multi_device"
_STREAM_ATTR = "_headroom_streamer"
ROOT = "(root)"  # the planner's name for the model's own tensors


def to_device(tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """The one place tensors are moved (a no-op when already there); tests spy on it."""
    return tensor.to(device, non_blocking=non_blocking)


def make_current(device: torch.device) -> None:
    """Make a CUDA ``device`` the current one while its modules run: Triton kernels (our INT8 path) and
    ``device="cuda"`` allocations follow the current device, not the tensors'. No-op for other devices."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def move_to(value: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """``value`` with every tensor inside it (tuples, lists, dicts, nested) on ``device``; other objects as is."""
    if isinstance(value, torch.Tensor):
        return to_device(value, device, non_blocking)
    if isinstance(value, tuple):
        moved = [move_to(v, device, non_blocking) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)  # namedtuples too
    if isinstance(value, list):
        return [move_to(v, device, non_blocking) for v in value]
    if isinstance(value, dict):
        if type(value) is dict:
            return {k: move_to(v, device, non_blocking) for k, v in value.items()}
        out = value.copy()  # dict subclasses (transformers ModelOutput) keep their type
        for k, v in value.items():
            out[k] = move_to(v, device, non_blocking)
        return out
    return value


@dataclass
class SplitStats:
    calls: int = 0  # hooked forwards that ran

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Placed:
    name: str
    module: nn.Module
    device: torch.device
    slot: int  # index of the device in the split (devices may repeat: ["cpu", "cpu"])
    own_only: bool  # an ancestor of blocks: only its own parameters/buffers belong to this unit
    original: torch.device | None = None
    streamed: bool = False  # a streamed block: the streamer owns its weights, the split only moves its inputs


class MultiDeviceSplit:
    """A model split across devices (see module docstring). Create it with :func:`enable_multi_device`."""

    def __init__(self, model: nn.Module, placed: list[_Placed], devices: list[torch.device],
                 block_names: list[str], output_device: torch.device | None, non_blocking: bool = True):
        self.model = model
        self.placed = placed
        self.devices = devices
        self.block_names = block_names
        self.output_device = output_device
        self.non_blocking = non_blocking
        self.stats = SplitStats()
        self._handles: list = []
        self._active = True
        self.streamer = None  # a BlockStreamer when the plan streams blocks (attach_streamer)
        for unit in placed:
            unit.original = _first_device(unit.module, unit.own_only)
            if not unit.streamed:
                _move(unit.module, unit.device, unit.own_only)
            if not unit.own_only:
                self._handles.append(unit.module.register_forward_pre_hook(self._pre_hook(unit.device),
                                                                           with_kwargs=True))
        self._saved_device: list[int] = []
        self._handles.append(model.register_forward_pre_hook(self._enter_hook()))
        self._handles.append(model.register_forward_hook(self._post_hook(output_device), always_call=True))

    def _pre_hook(self, device: torch.device):
        def hook(module, args, kwargs):
            if not self._active:
                return None
            self.stats.calls += 1
            make_current(device)
            return move_to(args, device, self.non_blocking), move_to(kwargs, device, self.non_blocking)

        return hook

    def _enter_hook(self):
        def hook(module, args):
            if self._active and any(d.type == "cuda" for d in self.devices) and torch.cuda.is_available():
                self._saved_device.append(torch.cuda.current_device())
            return None

        return hook

    def _post_hook(self, device: torch.device | None):
        def hook(module, args, output):
            if not self._active:
                return None
            if self._saved_device:  # also after an exception (always_call): the caller's device comes back
                make_current(torch.device("cuda", self._saved_device.pop()))
            return move_to(output, device, self.non_blocking) if device is not None else None

        return hook

    def device_of(self, name: str) -> torch.device:
        return self._unit(name).device

    def slot_of(self, name: str) -> int:
        """Index into :attr:`devices` of the device holding ``name`` (tells ``cpu`` from ``cpu``)."""
        return self._unit(name).slot

    def _unit(self, name: str) -> _Placed:
        for unit in self.placed:
            if unit.name == name:
                return unit
        raise KeyError(f"{name!r} is not a placed unit; units: {[u.name for u in self.placed][:8]}...")

    def blocks_on(self, slot: int) -> list[str]:
        return [u.name for u in self.placed if u.slot == slot and u.name in set(self.block_names)]

    def attach_streamer(self, plan: PlacementPlan, blocks: list[nn.Module], prefetch: int) -> None:
        """Stream ``plan.streamed`` onto ``plan.stream_device``: a :class:`BlockStreamer` over the blocks that run
        there (the resident ones stay as they are, the streamed ones are parked in pinned host memory)."""
        from .streaming import BlockStreamer

        streamed = set(plan.streamed_blocks())
        slot = self.slot_of(plan.streamed[0][0])  # the stream device's index (``_from_plan`` put them there)
        here = [(name, module) for name, module in zip(self.block_names, blocks)
                if name in streamed or self.slot_of(name) == slot]
        self.streamer = BlockStreamer([m for _, m in here], [n for n, _ in here],
                                      [n not in streamed for n, _ in here], self.devices[slot], prefetch=prefetch)

    def disable(self, device=None) -> None:
        """Remove the hooks (and the streamer); put every unit back where it was before the split (or all on
        ``device``). Idempotent."""
        if not self._active:
            return
        if self.streamer is not None:  # streamed blocks back as ordinary modules (host, or ``device``)
            self.streamer.disable(device)
            self.streamer = None
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for unit in self.placed:
            if unit.streamed and device is None:
                continue  # the streamer left it on the host, where it was parked
            target = torch.device(device) if device is not None else unit.original
            if target is not None:
                _move(unit.module, target, unit.own_only)
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    def summary(self) -> str:
        parts = [f"{dev} #{i}: {len(self.blocks_on(i))} blocks" for i, dev in enumerate(self.devices)]
        streamed = f"; {self.streamer.summary()}" if self.streamer is not None else ""
        return (f"split across {len(self.devices)} devices ({', '.join(parts)}), output on "
                f"{self.output_device}{streamed}")

    def __repr__(self) -> str:
        return f"<MultiDeviceSplit {self.summary() if self._active else 'disabled'}>"


def enable_multi_device(model: nn.Module, plan_or_devices: PlacementPlan | Sequence, *, blocks=None,
                        output_device="first", non_blocking: bool = True) -> MultiDeviceSplit:
    """Split ``model`` across devices and run it so (see module docstring); returns the :class:`MultiDeviceSplit`.

    ``plan_or_devices``: a :class:`PlacementPlan` from ``plan_placement(model, budgets, devices=[...])`` (made
    with the same ``blocks``), or a list of devices (``["cuda:0", "cuda:1"]``; blocks split evenly by bytes).
    ``blocks``: as in :func:`resolve_blocks` (None = automatic). ``output_device``: "first" (default), a
    device, or None (leave the output where the last module produced it). Undo with ``split.disable()``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable_multi_device needs the model (nn.Module), got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already split; call .disable() on its split first")
    if getattr(model, _STREAM_ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is block-streaming; a model is split across devices or "
                           "streamed, not both (yet): call disable_block_streaming(model) first")
    _, names, mods = resolve_blocks(model, blocks)
    units = collect_units(model, names, mods, critical=())  # a split needs names, kinds and bytes: never "critical"
    plan = plan_or_devices if isinstance(plan_or_devices, PlacementPlan) else None
    if plan is not None:
        devices, slot_of = _from_plan(plan, names, units)
    else:
        devices = [torch.device(d) if not isinstance(d, int) else torch.device("cuda", d) for d in plan_or_devices]
        if not devices:
            raise ValueError("enable_multi_device: no devices given")
        slot_of = even_split(units, len(devices))
    block_ids = {id(m) for m in mods}
    ancestors = {n for n, m in model.named_modules() if id(m) not in block_ids and any(id(c) in block_ids for c in m.modules())}
    streamed_blocks = set(plan.streamed_blocks()) if plan is not None else set()
    placed = []
    for unit in units:
        name = "" if unit.name == ROOT else unit.name
        module = model.get_submodule(name)
        slot = slot_of[unit.name]
        placed.append(_Placed(unit.name, module, devices[slot], slot, own_only=name in ancestors,
                              streamed=unit.name in streamed_blocks))
    out = None if output_device is None else (devices[0] if output_device == "first" else torch.device(output_device))
    split = MultiDeviceSplit(model, placed, devices, names, out, non_blocking)
    if plan is not None and plan.streamed:
        split.attach_streamer(plan, mods, prefetch=max(1, plan.ring_slots - 1))
    setattr(model, _ATTR, split)
    log.info("headroom: %s", split.summary())
    return split


def split_of(model: nn.Module) -> "MultiDeviceSplit | None":
    """The :class:`MultiDeviceSplit` that :func:`enable_multi_device` attached to ``model``, or None."""
    return getattr(model, _ATTR, None)


def disable_multi_device(model_or_split, device=None) -> None:
    """Undo :func:`enable_multi_device` (see :meth:`MultiDeviceSplit.disable`)."""
    split = model_or_split if isinstance(model_or_split, MultiDeviceSplit) else getattr(model_or_split, _ATTR, None)
    if split is None:
        raise ValueError(f"{type(model_or_split).__name__} is not split across devices")
    split.disable(device)


def even_split(units, n_devices: int) -> dict[str, int]:
    """Blocks in order over ``n_devices`` with about equal bytes each; head units with the first block, tail
    units with the last (the planner's rule)."""
    blocks = [u for u in units if u.kind == "block"]
    total = sum(u.bytes for u in blocks) or 1
    slot_of: dict[str, int] = {}
    done = 0
    for u in blocks:
        slot_of[u.name] = min(n_devices - 1, int((done + u.bytes / 2) * n_devices / total))
        done += u.bytes
    first = slot_of[blocks[0].name] if blocks else 0
    last = slot_of[blocks[-1].name] if blocks else 0
    for u in units:
        if u.kind != "block":
            slot_of[u.name] = first if u.kind == "head" else last
    return slot_of


def _from_plan(plan: PlacementPlan, names: list[str], units) -> tuple[list[torch.device], dict[str, int]]:
    if list(plan.block_names) != names:
        raise ValueError(f"the plan was made for blocks {plan.block_names[:3]}... but this model's blocks are "
                         f"{names[:3]}...: plan and split the same model with the same `blocks`")
    slot_of = {n: i for i, dp in enumerate(plan.devices) for n, _ in dp.modules}
    if plan.streamed:  # streamed blocks run on the stream device (the one at the end of the chain)
        stream_slot = next((i for i, dp in enumerate(plan.devices) if dp.device == plan.stream_device), None)
        if stream_slot is None:
            raise ValueError(f"the plan streams onto {plan.stream_device}, which is none of its devices "
                             f"{[dp.device for dp in plan.devices]}")
        slot_of.update({n: stream_slot for n, _ in plan.streamed})
    missing = [u.name for u in units if u.name not in slot_of]
    if missing:
        raise ValueError(f"the plan does not place {missing[:5]}: make it with plan_placement on this model")
    return [torch.device(dp.device) for dp in plan.devices], slot_of


def _own_tensors(module: nn.Module):
    return [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]


def _first_device(module: nn.Module, own_only: bool) -> torch.device | None:
    tensors = _own_tensors(module) if own_only else list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else None


def _move(module: nn.Module, device: torch.device, own_only: bool) -> None:
    """Whole sub-trees move with ``.to`` (so Int8Linear / bitsandbytes moves apply); an ancestor of blocks
    moves only its own tensors."""
    if not own_only:
        module.to(device)
        return
    for key, param in module._parameters.items():
        if param is not None and param.device != device:
            param.data = param.data.to(device)
    for key, buf in module._buffers.items():
        if buf is not None and buf.device != device:
            module._buffers[key] = buf.to(device)
