"""Block streaming: run a model whose non-resident blocks live in pinned host memory or on disk.

Entry point: :func:`enable_block_streaming` -> :class:`BlockStreamer` (``.disable()`` puts the model back
to normal). How it works:

* Each streamed block's tensors are packed once into its own flat, page-locked (pinned) host buffer; the
  block's parameters/buffers (and bitsandbytes 4-bit quant states) are re-pointed at views of that buffer.
* A ring of ``prefetch + 1`` GPU slots, each as large as the largest streamed block, is allocated once.
* A forward pre-hook on every block (resident or streamed) makes sure the next ``prefetch`` streamed blocks
  (in list order, wrapping around to the next forward pass) are being copied into ring slots on a side
  CUDA stream: one ``non_blocking`` host->device copy of the whole flat buffer per block, then the block's
  tensors are re-pointed at views of the slot. The compute stream waits on the copy's event before a
  streamed block runs; a slot is refilled only after the compute stream has passed the event recorded when
  its previous block finished (forward hook). No pageable copies, no allocation per step.
* Disk tier (a plan with ``ram_budget_bytes``, see :mod:`.planner`): a block on disk owns no host buffer; its
  tensors point at one-element placeholders between passes and a background thread (:class:`.disk.DiskReader`)
  reads it from its safetensors file into a small ring of pinned buffers ahead of the GPU copy. Prefetch only
  copies a disk block that has been read already (it never waits for the disk); the block's own pre-hook waits.
* Without CUDA (or with a CPU ``device``) the same code runs with plain synchronous copies, so the CPU tests
  exercise the hooks and the bookkeeping.

Assumptions (documented limits): inference only (no autograd through streamed weights); blocks are called
one at a time, not re-entrantly; the block list order is the execution order (calls out of order still
work - a block that is not in a slot is copied on demand - but lose the overlap); torch.compile / CUDA
graphs must not capture the streamed blocks. Streamed blocks' weights are only valid inside their forward.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..units import GB
from .blocks import resolve_blocks
from .disk import DiskReader, SafetensorsSource, placeholder, plan_block_read, read_block_once
from .planner import DEFAULT_PREFETCH, plan_placement
from .tensors import FlatLayout, collect_tensor_refs, empty_host

log = logging.getLogger("comfyui_headroom")

_ATTR = "_headroom_streamer"


@dataclass
class StreamStats:
    copies: int = 0  # block copies into a slot
    bytes_copied: int = 0
    on_demand: int = 0  # copies issued by the block's own pre-hook (prefetch missed it)
    hits: int = 0  # streamed block found already in its slot

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Slot:
    buffer: torch.Tensor
    holder: int | None = None
    free_event: object | None = None  # recorded on the compute stream after the holder's forward


@dataclass
class _Streamed:
    layout: FlatLayout
    host: torch.Tensor | None  # None: the block is on disk
    host_views: list[torch.Tensor]
    slot: int | None = None
    ready_event: object | None = None
    slot_views: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class BlockStreamer:
    """Hooks + buffers that stream some blocks of a model (see module docstring). Create it with
    :func:`enable_block_streaming`."""

    def __init__(self, blocks: list[nn.Module], names: list[str], resident: list[bool], device,
                 prefetch: int = DEFAULT_PREFETCH, pin_memory: bool | None = None,
                 on_disk: list[bool] | None = None, disk_source: SafetensorsSource | None = None):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if len(blocks) != len(resident):
            raise ValueError(f"{len(blocks)} blocks but {len(resident)} resident flags")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.pin_memory = self.cuda if pin_memory is None else pin_memory
        if self.pin_memory and not self.cuda:
            raise ValueError("pin_memory=True needs a CUDA device; pass pin_memory=False to stream on CPU")
        if self.cuda and not self.pin_memory:
            log.warning("headroom: streaming from pageable host memory - copies run ~8x slower than from pinned "
                        "memory and block the CPU; use pin_memory=True (the default)")
        self.blocks = blocks
        self.names = names
        self.prefetch = prefetch
        self.stats = StreamStats()
        self._handles: list = []
        self._streamed: dict[int, _Streamed] = {}
        self._slots: list[_Slot] = []
        self._next_slot = 0
        self._active = True
        self.graphs = None  # BlockGraphs when enable_block_streaming(..., cuda_graphs=True)
        self.disk_reader: DiskReader | None = None
        self.disk_source = disk_source
        on_disk = on_disk or [False] * len(blocks)
        disk_order = [i for i in range(len(blocks)) if on_disk[i] and not resident[i]]
        if disk_order and disk_source is None:
            raise ValueError(f"{len(disk_order)} blocks are planned on disk but no disk source was given: pass "
                             "disk=<the model's safetensors file(s)>")
        # Blocks never loaded (meta) are read from the file once, into RAM (or the device).
        unloaded = [i for i in range(len(blocks)) if i not in disk_order and _has_meta(blocks[i])]
        if unloaded and disk_source is None:
            raise ValueError(f"block {names[unloaded[0]]} has no data (meta device) and no disk source was given: "
                             "load it, or pass disk=<the model's safetensors file(s)>")
        # Plan every read before touching the model: a block the file cannot serve leaves it as it was.
        layouts = {i: FlatLayout(materialize_meta(collect_tensor_refs(blocks[i]))) for i in disk_order + unloaded}
        reads = {i: plan_block_read(names[i], layouts[i], disk_source) for i in layouts}

        for i, (block, keep) in enumerate(zip(blocks, resident)):
            if i in unloaded:
                host = empty_host(layouts[i].nbytes, self.pin_memory and not keep)
                read_block_once(reads[i], host)
                layouts[i].point_to(layouts[i].views(host))
            if keep:
                block.to(self.device)
            elif i in disk_order:
                self._streamed[i] = self._park_on_disk(layouts[i])
            elif i in unloaded:  # already in its own host buffer: that is its parking place
                self._streamed[i] = _Streamed(layouts[i], host, layouts[i].views(host))
                layouts[i].point_to(self._streamed[i].host_views)
            else:
                self._streamed[i] = self._park(block)
        reads = {i: reads[i] for i in disk_order}
        if disk_order:
            self.disk_reader = DiskReader(reads, disk_order, prefetch + 1, self.pin_memory)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._block_bytes = [self._streamed[i].layout.nbytes if i in self._streamed
                             else FlatLayout(collect_tensor_refs(block)).nbytes for i, block in enumerate(blocks)]
        self.demoted: list[int] = []  # blocks planned resident that shrink() streamed (RAM or disk), last one last
        self._schedule()
        for i, block in enumerate(blocks):  # every block: shrink() may turn a resident block into a streamed one
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(i)))

    def _ring_shape(self, streamed: list[int]) -> tuple[int, int]:
        """(slots, bytes per slot) of the ring for these streamed blocks: ``prefetch + 1`` slots (fewer when
        fewer blocks stream), each as large as the largest streamed block."""
        if not streamed:
            return 0, 0
        return min(self.prefetch + 1, len(streamed)), max(self._block_bytes[i] for i in streamed)

    def _schedule(self) -> None:
        """Look-ahead tables and the ring for the blocks streamed now (at start, and after shrink/grow). A ring
        of the right shape is kept; otherwise it is allocated again. Views of every streamed block in every
        slot are made here, once: creating them costs far more than re-pointing."""
        order = [i for i in range(len(self.blocks)) if i in self._streamed]
        self._lookahead = {}
        for i in range(len(self.blocks)):  # the next `prefetch` streamed blocks after position i (cyclic)
            after = [j for j in order if j > i] + [j for j in order if j <= i]
            self._lookahead[i] = [j for j in after if j != i][: self.prefetch]
        n_slots, slot_bytes = self._ring_shape(order)
        if (len(self._slots), self._slots[0].buffer.numel() if self._slots else 0) != (n_slots, slot_bytes):
            self._slots.clear()  # before the new ring is allocated: the old one's memory is reused
            for entry in self._streamed.values():
                entry.slot_views.clear()
            self._slots = [_Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device))
                           for _ in range(n_slots)]
        self._next_slot = 0
        for i in order:
            for slot_id in range(n_slots):
                self._slot_views(i, slot_id)

    # -- setup -------------------------------------------------------------------------------------------
    def _park(self, block: nn.Module, host: torch.Tensor | None = None) -> _Streamed:
        """Pack ``block`` into a host buffer of its own (``host``, else a new one) and point it there."""
        layout = FlatLayout(collect_tensor_refs(block))
        host = empty_host(layout.nbytes, self.pin_memory) if host is None else host
        views = layout.pack(host)
        layout.point_to(views)
        return _Streamed(layout, host, views)

    @staticmethod
    def _park_on_disk(layout: FlatLayout) -> _Streamed:
        views = [placeholder(shape, dtype) for shape, dtype in zip(layout.shapes, layout.dtypes)]
        layout.point_to(views)  # the block's own copies (if it was loaded) are let go
        return _Streamed(layout, None, views)

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def streamed_indices(self) -> list[int]:
        return sorted(self._streamed)

    @property
    def streamed_bytes(self) -> int:
        return sum(s.layout.nbytes for s in self._streamed.values())

    @property
    def ring_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self._slots)

    def slot_of(self, index: int) -> int | None:
        """The ring slot block ``index``'s weights are in now (None: resident, or not in a slot)."""
        entry = self._streamed.get(index)
        return entry.slot if entry is not None else None

    def host_buffers(self) -> list[torch.Tensor]:
        """The flat host buffers of the blocks streamed from RAM (pinned on CUDA)."""
        return [self._streamed[i].host for i in self.streamed_indices if self._streamed[i].host is not None]

    @property
    def disk_indices(self) -> list[int]:
        return [i for i in self.streamed_indices if self._streamed[i].host is None]

    def tier_counts(self) -> dict[str, int]:
        """Blocks per tier: ``{"gpu": .., "ram": .., "disk": ..}`` (``gpu``: resident on the device)."""
        disk = len(self.disk_indices)
        return {"gpu": len(self.blocks) - len(self._streamed), "ram": len(self._streamed) - disk, "disk": disk}

    @property
    def host_bytes(self) -> int:
        """Host RAM the streamed blocks take: their pinned buffers + the disk read ring."""
        ring = self.disk_reader.ring_bytes if self.disk_reader is not None else 0
        return sum(h.numel() for h in self.host_buffers()) + ring

    # -- resizing at run time: ComfyUI's partial unload and load -----------------------------------------------
    @property
    def resizable(self) -> bool:
        """Whether :meth:`shrink` / :meth:`grow` may move blocks now: not with CUDA graphs (they captured the
        resident blocks' addresses)."""
        return self._active and self.graphs is None

    def device_bytes(self, streamed: set[int] | None = None) -> int:
        """Bytes the blocks take on the device: the resident ones and the ring - now, or with ``streamed``
        the blocks streamed instead."""
        streamed = set(self._streamed) if streamed is None else streamed
        n_slots, slot_bytes = self._ring_shape(sorted(streamed))
        return sum(b for i, b in enumerate(self._block_bytes) if i not in streamed) + n_slots * slot_bytes

    def plan_shrink(self, nbytes: int) -> list[int] | None:
        """The resident blocks to stream so that the device holds ``nbytes`` less (the ring grows with the first
        ones), in order; None when even streaming every block would not free that much. Each pick is the middle of
        the longest run of resident blocks, so the remaining ones stay spread between the streamed ones and keep
        hiding their copies."""
        before = self.device_bytes()
        streamed = set(self._streamed)
        chosen: list[int] = []
        while before - self.device_bytes(streamed) < nbytes:
            pick = _middle_of_longest_run([i not in streamed for i in range(len(self.blocks))])
            if pick is None:
                return None
            streamed.add(pick)
            chosen.append(pick)
        return chosen

    def host_cost(self, blocks: list[int], tier: str) -> int:
        """Host RAM that streaming ``blocks`` as well would add: in the ``"ram"`` tier their pinned copies; on
        ``"disk"`` (read from the model's file like the planned disk blocks) the growth of the read ring."""
        if tier == "ram":
            return sum(self._block_bytes[i] for i in blocks)
        order = self.disk_indices + list(blocks)
        ring = self.disk_reader.ring_bytes if self.disk_reader is not None else 0
        return min(self.prefetch + 1, len(order)) * max(self._block_bytes[i] for i in order) - ring

    def shrink(self, nbytes: int, host_room: int | None = None) -> int:
        """Free at least ``nbytes`` of device memory by streaming resident blocks, within ``host_room`` bytes of
        host RAM (None: no limit): from pinned RAM (packed as the planned streamed ones are) where that fits, else
        - on a streamer with a disk source - from the model's file (read as the planned disk blocks are). All or
        nothing: 0 when that cannot free enough, or when the streamer cannot be resized (:attr:`resizable`).
        Returns the bytes freed. Call between forward passes."""
        chosen = self.plan_shrink(nbytes) if self.resizable and nbytes > 0 else None
        if not chosen:
            return 0
        fits = lambda tier: host_room is None or self.host_cost(chosen, tier) <= host_room  # noqa: E731
        tier = "ram" if fits("ram") else "disk" if self.disk_source is not None and fits("disk") else None
        if tier is None:
            return 0
        try:  # every host buffer and read first: pinned memory may run out, and then nothing has moved
            if tier == "ram":
                hosts = [empty_host(self._block_bytes[i], self.pin_memory) for i in chosen]
            else:
                layouts = {i: FlatLayout(collect_tensor_refs(self.blocks[i])) for i in chosen}
                reads = {i: plan_block_read(self.names[i], layouts[i], self.disk_source) for i in chosen}
                known = self.disk_reader.reads if self.disk_reader is not None else {}
                reader = DiskReader({**known, **reads}, sorted(self.disk_indices + chosen), self.prefetch + 1,
                                    self.pin_memory)
        except RuntimeError as err:  # DiskTierError too: a block the file does not hold as it is now
            log.warning("headroom: could not stream %d more blocks (%s); the model is unloaded instead",
                        len(chosen), str(err).splitlines()[0])
            return 0
        before = self.device_bytes()
        self._quiesce()
        if tier == "ram":
            for i, host in zip(chosen, hosts):
                self._streamed[i] = self._park(self.blocks[i], host)
        else:
            if self.disk_reader is not None:
                self.disk_reader.close()
            self.disk_reader = reader
            for i in chosen:
                self._streamed[i] = self._park_on_disk(layouts[i])
        self.demoted += chosen
        self._schedule()
        return before - self.device_bytes()

    def grow(self, nbytes: int | None = None) -> int:
        """Put blocks that :meth:`shrink` streamed back on the device, the last demoted first, while the device
        holds at most ``nbytes`` more (None: all of them). Returns the bytes added (negative when the ring
        shrank more than the blocks added)."""
        if not self.demoted or not self.resizable:
            return 0
        before = self.device_bytes()
        streamed = set(self._streamed)
        back = []
        for i in reversed(self.demoted):
            if nbytes is not None and self.device_bytes(streamed - {i}) - before > nbytes:
                break
            streamed.discard(i)
            back.append(i)
        if not back:
            return 0
        self._quiesce()
        from_disk = []
        for i in back:
            entry = self._streamed[i]
            try:
                moved = [view.to(self.device) for view in self._host_copy(i, entry)]
            except torch.OutOfMemoryError:  # less room than counted (another model, fragmentation): stop here
                log.warning("headroom: no room to bring block %s back to %s; %d blocks stay streamed",
                            self.names[i], self.device, len(self.demoted))
                break
            entry.layout.point_to(moved)
            del self._streamed[i]
            self.demoted.remove(i)
            from_disk += [i] if entry.host is None else []
        if from_disk:  # the read ring follows the blocks that are still on disk
            reads, remaining = self.disk_reader.reads, self.disk_indices
            self.disk_reader.close()
            self.disk_reader = DiskReader({i: reads[i] for i in remaining}, remaining, self.prefetch + 1,
                                          self.pin_memory) if remaining else None
        self._schedule()
        return self.device_bytes() - before

    def _host_copy(self, index: int, entry: _Streamed) -> list[torch.Tensor]:
        """Views of block ``index``'s tensors in host memory: its pinned copy, or read from the file."""
        if entry.host is not None:
            return entry.host_views
        host = empty_host(entry.layout.nbytes, self.pin_memory)
        self.disk_reader.read_into(index, host)
        return entry.layout.views(host)

    def _quiesce(self) -> None:
        """Wait for the device, and point every block that sits in a ring slot back at its host copy: the ring
        holds nothing afterwards."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for entry in self._streamed.values():
            if entry.slot is not None:
                entry.layout.fast_point_to(entry.host_views)
                entry.slot = None
        for slot in self._slots:
            slot.holder = None
            slot.free_event = None

    # -- the streaming machinery -----------------------------------------------------------------------------
    def _slot_views(self, index: int, slot: int) -> list[torch.Tensor]:
        entry = self._streamed[index]
        views = entry.slot_views.get(slot)
        if views is None:
            views = entry.layout.views(self._slots[slot].buffer)
            entry.slot_views[slot] = views
        return views

    def _ensure(self, index: int, on_demand: bool = False) -> None:
        """Make sure block ``index`` is (being) copied into a slot and its tensors point there."""
        entry = self._streamed[index]
        if entry.slot is not None:
            if on_demand:
                self.stats.hits += 1
            return
        staging = None
        if entry.host is None:  # on disk: prefetch copies it only once the reader has it
            staging = self.disk_reader.take(index) if on_demand else self.disk_reader.try_take(index)
            if staging is None:
                return
        source = entry.host if staging is None else staging[1]
        slot_id = self._next_slot
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        slot = self._slots[slot_id]
        if slot.holder is not None:  # evict: the old holder points back at its host copy
            old = self._streamed[slot.holder]
            old.layout.fast_point_to(old.host_views)
            old.slot = None
        n = entry.layout.nbytes
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if slot.free_event is not None:
                    self.copy_stream.wait_event(slot.free_event)
                slot.buffer[:n].copy_(source[:n], non_blocking=True)
                if entry.ready_event is None:
                    entry.ready_event = torch.cuda.Event()
                entry.ready_event.record(self.copy_stream)
            if staging is not None:
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
                self.disk_reader.release(staging[0], copied)
        else:
            slot.buffer[:n].copy_(source[:n])
            if staging is not None:
                self.disk_reader.release(staging[0])
        slot.holder = index
        entry.slot = slot_id
        entry.layout.fast_point_to(self._slot_views(index, slot_id))
        self.stats.copies += 1
        self.stats.bytes_copied += n
        if on_demand:
            self.stats.on_demand += 1

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            if not self._active:
                return None
            streamed = index in self._streamed
            if streamed:
                self._ensure(index, on_demand=True)
            for j in self._lookahead[index]:
                self._ensure(j)
            if streamed and self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._streamed[index].ready_event)
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            if not self._active:
                return None
            entry = self._streamed.get(index)
            if self.cuda and entry is not None and entry.slot is not None:
                slot = self._slots[entry.slot]
                if slot.free_event is None:
                    slot.free_event = torch.cuda.Event()
                slot.free_event.record(torch.cuda.current_stream(self.device))
            return None

        return post_hook

    # -- teardown ----------------------------------------------------------------------------------------------
    def disable(self, device=None, load_disk_blocks: bool = True) -> None:
        """Remove the hooks and the ring. Streamed blocks end up as ordinary modules on the host (pinned
        memory), or on ``device`` when given; disk blocks are read back from their file first, or - with
        ``load_disk_blocks=False``, for a caller about to drop the model - left without data (meta device).
        Idempotent."""
        if not self._active:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.graphs is not None:
            self.graphs.remove()
            self.graphs = None
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.disk_reader is not None:
            self.disk_reader.close()
        for index, entry in self._streamed.items():
            if entry.host is None and not load_disk_blocks:
                refs_to_meta(entry.layout.refs)
                continue
            if entry.host is None:  # on disk: read back into host memory, the block becomes ordinary again
                entry.host = empty_host(entry.layout.nbytes, self.pin_memory)
                self.disk_reader.read_into(index, entry.host)
                entry.host_views = entry.layout.views(entry.host)
            entry.layout.point_to(entry.host_views)
            entry.slot = None
            entry.slot_views.clear()
            if device is not None:
                self.blocks[index].to(device)
        self._slots.clear()
        self._streamed.clear()
        self.disk_reader = None
        for holder in list(_OWNERS.get(id(self), [])):
            owner = holder()
            if owner is not None and getattr(owner, _ATTR, None) is self:
                delattr(owner, _ATTR)
        _OWNERS.pop(id(self), None)

    def summary(self) -> str:
        n = len(self.blocks)
        text = (f"streaming {len(self._streamed)}/{n} blocks onto {self.device} "
                f"({self.streamed_bytes / GB:.2f} GB from {'pinned' if self.pin_memory else 'pageable'} host "
                f"memory, ring {len(self._slots)} x {self.ring_bytes / max(len(self._slots), 1) / GB:.2f} GB)")
        if self.disk_reader is not None:
            tiers, stats = self.tier_counts(), self.disk_reader.stats
            rate = f", read {stats.gb_per_s:.2f} GB/s" if stats.gb_per_s else ""
            text += (f"; blocks: {tiers['gpu']} on the GPU, {tiers['ram']} in RAM, {tiers['disk']} on disk "
                     f"({self.host_bytes / GB:.2f} GB of RAM{rate})")
        if self.demoted:  # why a model runs slower than its plan: another model needed the memory
            text += f"; {len(self.demoted)} of them moved off the GPU to make room for another model"
        return text

    def __repr__(self) -> str:
        return f"<BlockStreamer {self.summary() if self._active else 'disabled'}>"


_OWNERS: dict[int, list] = {}


def enable_block_streaming(model_or_blocks, device, *, blocks=None, blocks_resident: int | None = None,
                           budget_bytes: int | None = None, prefetch: int = DEFAULT_PREFETCH,
                           pin_memory: bool | None = None, critical=(), plan=None, order: str = "spread",
                           cuda_graphs: bool = False, ram_budget_bytes: int | None = None,
                           disk=None) -> BlockStreamer:
    """Stream the blocks of a model that do not stay resident on ``device``; returns the :class:`BlockStreamer`.

    ``model_or_blocks``: a model (its blocks found automatically or named by ``blocks``: ``"model.layers"``,
    ``["double_blocks", "single_blocks"]`` or a list of modules) or directly the list of blocks. With a model,
    everything that is not a block is moved to ``device``. Which blocks stay resident: ``plan`` (a
    :class:`PlacementPlan` for this device), else ``blocks_resident=N`` (N blocks in VRAM, seed 002's
    ``blocks_in_memory``: the critical ones, then others spread evenly - ``order="first"``: the first ones;
    with ``budget_bytes`` too, at most N),
    else ``budget_bytes`` (as many as fit, via :func:`plan_placement`), else 55 % of the device's VRAM on
    CUDA / no resident block on CPU. ``critical`` patterns name blocks that never stream.
    ``pin_memory``: default True on CUDA (streaming from pageable memory is ~8x slower), False on CPU.
    ``cuda_graphs=True`` replays every block from CUDA graphs (:mod:`.graphs`; one per ring slot for a streamed
    block): the step no longer depends on the CPU's speed; ignored off CUDA.
    ``ram_budget_bytes`` (with no ``plan``): host RAM for the streamed blocks; the others are read from ``disk``
    (a :class:`.disk.SafetensorsSource`, or the model's safetensors file(s)) on every pass - the disk tier. Disk
    blocks must hold exactly the file's tensors (names ``<block name>.<tensor>``, same dtype and shape); their
    parameters may be on the meta device (never loaded).
    Remove with ``streamer.disable()`` or :func:`disable_block_streaming`.
    """
    device = torch.device(device)
    model, names, mods = resolve_blocks(model_or_blocks, blocks)
    if model is not None and getattr(model, _ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already streaming; call disable_block_streaming(model) first")
    target = model if model is not None else mods
    if plan is None:
        totals = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
        budget = budget_bytes
        if budget is None and blocks_resident is None:
            if totals is None:
                blocks_resident = 0  # CPU without a budget: stream every block
            else:
                budget = None  # 55 % of the card (plan_placement's default)
        count_only = budget is None and blocks_resident is not None
        plan = plan_placement(target, 1 << 62 if count_only else budget, critical or (), blocks_resident,
                              blocks=blocks if model is not None else None, devices=[device],
                              device_totals=None if count_only else totals, prefetch=prefetch, order=order,
                              ram_budget_bytes=ram_budget_bytes)
    if list(plan.block_names) != names:
        raise ValueError(f"the plan was made for blocks {plan.block_names[:3]}... but this model's blocks are "
                         f"{names[:3]}...: plan and stream the same model with the same `blocks`")
    streamed = set(plan.streamed_blocks())
    resident = [n not in streamed for n in names]
    on_disk_names = set(plan.disk_blocks())
    on_disk = [n in on_disk_names for n in names]
    if disk is not None and not isinstance(disk, SafetensorsSource):
        disk = SafetensorsSource(disk)
    streamer = BlockStreamer(mods, names, resident, device, prefetch=prefetch, pin_memory=pin_memory,
                             on_disk=on_disk, disk_source=disk)
    if model is not None:
        block_ids = {id(m) for m in mods}
        _move_rest(model, block_ids, device)
    if cuda_graphs:
        if device.type == "cuda":
            from .graphs import graph_blocks

            streamer.graphs = graph_blocks(mods, names, slot_of=streamer.slot_of)
        else:
            log.warning("headroom: cuda_graphs=True ignored: streaming onto %s", device)
    if model is not None:
        setattr(model, _ATTR, streamer)
        _OWNERS[id(streamer)] = [weakref.ref(model)]
    log.info("headroom: %s", streamer.summary())
    return streamer


def _middle_of_longest_run(flags: list[bool]) -> int | None:
    """The index in the middle of the longest run of True in ``flags`` (the first such run), or None."""
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    return best_start + best_len // 2 if best_len else None


def _has_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers()))


def materialize_meta(refs):
    """Give tensors on the meta device (a block never loaded) a placeholder, so they can be re-pointed."""
    for ref in refs:
        tensor = ref.get()
        if tensor.device.type == "meta":
            if ref.kind == "param":
                ref.owner._parameters[ref.attr] = nn.Parameter(placeholder(tensor.shape, tensor.dtype),
                                                               requires_grad=False)
            else:
                ref.set(placeholder(tensor.shape, tensor.dtype))
    return refs


def refs_to_meta(refs) -> None:
    """Point tensors at the meta device: a block that will never run again owns no memory and cannot compute
    garbage."""
    for ref in refs:
        tensor = ref.get()
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if ref.kind == "param":
            ref.owner._parameters[ref.attr] = nn.Parameter(meta, requires_grad=False)
        else:
            ref.set(meta)


def _move_rest(module: nn.Module, block_ids: set[int], device) -> None:
    """Move every tensor of ``module`` that is not inside a block to ``device`` (sub-trees without a block
    move with ``.to`` so layer-specific moves - Int8Linear, bitsandbytes - apply)."""
    for key, param in module._parameters.items():
        if param is not None and param.device != device:
            param.data = param.data.to(device)
    for key, buf in module._buffers.items():
        if buf is not None and buf.device != device:
            module._buffers[key] = buf.to(device)
    for child in module.children():
        if id(child) in block_ids:
            continue
        if any(id(m) in block_ids for m in child.modules()):
            _move_rest(child, block_ids, device)
        else:
            child.to(device)


def streamer_of(model: nn.Module) -> "BlockStreamer | None":
    """The :class:`BlockStreamer` that :func:`enable_block_streaming` attached to ``model``, or None."""
    return getattr(model, _ATTR, None)


def disable_block_streaming(model_or_streamer, device=None) -> None:
    """Undo :func:`enable_block_streaming` (see :meth:`BlockStreamer.disable`)."""
    streamer = model_or_streamer if isinstance(model_or_streamer, BlockStreamer) \
        else getattr(model_or_streamer, _ATTR, None)
    if streamer is None:
        raise ValueError(f"{type(model_or_streamer).__name__} is not streaming")
    streamer.disable(device)
