"""Soft unload (park a model in pinned RAM and bring it back at PCIe speed) and force unload (give VRAM back).

Soft unload packs the model's tensors into a few large flat host buffers (pinned on CUDA), re-points the
modules at views of them and lets the GPU copies go; :func:`restore` copies each flat buffer back in one
transfer and re-points the modules at views of the new GPU buffers. Modules, ``Parameter`` objects and hooks
stay the same objects, so INT8 (Int8Linear), bf16 and bitsandbytes 4-bit and LLM.int8 layers come back
bit-identical (LLM.int8's scales and weight aliases travel too: ``memory/tensors.py``). The
pinned buffers are kept (per model) and reused by the next soft unload while the layout is unchanged;
:func:`release_pinned` gives them back.

Force unload (seed 001's "nuclear option") is described on :func:`force_unload`.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..units import GB
from .tensors import FlatLayout, collect_tensor_refs, empty_host, tensor_nbytes

log = logging.getLogger("comfyui_headroom")

DEFAULT_CHUNK_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------------------------
# soft unload / restore
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Chunk:
    layout: FlatLayout
    host: torch.Tensor
    host_views: list[torch.Tensor]


@dataclass
class SoftUnloadHandle:
    """Pinned host copy of one model (kept for reuse), and what the last transfer measured."""

    chunks: list[_Chunk]
    device: torch.device  # where the weights were before the unload (default target of restore)
    pinned: bool
    state: str = "parked"  # "parked" | "restored"
    last_seconds: float = 0.0
    last_direction: str = ""
    reused: bool = False

    @property
    def nbytes(self) -> int:
        return sum(c.layout.nbytes for c in self.chunks)

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / GB / self.last_seconds if self.last_seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"{self.last_direction} {self.nbytes / GB:.2f} GB in {self.last_seconds:.3f}s "
                f"({self.gb_per_s:.1f} GB/s, {'pinned' if self.pinned else 'pageable'} host memory"
                f"{', reused buffers' if self.reused else ''})")


_HANDLES: "weakref.WeakKeyDictionary[nn.Module, SoftUnloadHandle]" = weakref.WeakKeyDictionary()


def _chunks_of(refs, chunk_bytes: int) -> list[list]:
    groups, current, size = [], [], 0
    for ref in refs:
        n = tensor_nbytes(ref.get())
        if current and size + n > chunk_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(ref)
        size += n
    if current:
        groups.append(current)
    return groups


def _model_device(refs) -> torch.device:
    for ref in refs:
        t = ref.get()
        if t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def soft_unload(model: nn.Module, pin_memory: bool | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                empty_cache: bool = True) -> SoftUnloadHandle:
    """Park ``model``'s weights in (pinned) host memory; returns the handle (``str()`` says GB/s).

    ``pin_memory``: default True when CUDA is available. Calling it again on a parked model is a no-op.
    """
    handle = _HANDLES.get(model)
    if handle is not None and handle.state == "parked":
        return handle
    if getattr(model, "_headroom_streamer", None) is not None:
        raise ValueError(f"{type(model).__name__} is streaming its blocks; call disable_block_streaming(model) "
                         "before soft_unload")
    if getattr(model, "_headroom_multi_device", None) is not None:  # restore would put it all on one device
        raise ValueError(f"{type(model).__name__} is split across devices; call disable_multi_device(model) "
                         "before soft_unload")
    refs = collect_tensor_refs(model, bnb_int8=True)
    if not refs:
        raise ValueError(f"{type(model).__name__} has no parameters or buffers to unload")
    device = _model_device(refs)
    pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
    groups = _chunks_of(refs, chunk_bytes)
    reuse = (handle is not None and handle.pinned == pinned and len(handle.chunks) == len(groups)
             and all(c.layout.matches(g) for c, g in zip(handle.chunks, groups)))
    _sync(device)
    t0 = time.perf_counter()
    if reuse:
        chunks = handle.chunks
        for chunk, group in zip(chunks, groups):
            chunk.layout.refs = group  # same shapes; the tensors are the current GPU ones
    else:
        chunks = []
        for group in groups:
            layout = FlatLayout(group)
            host = empty_host(layout.nbytes, pinned)
            chunks.append(_Chunk(layout, host, layout.views(host)))
    for chunk in chunks:
        for ref, view in zip(chunk.layout.refs, chunk.host_views):
            view.copy_(ref.get().detach(), non_blocking=pinned)
    _sync(device)
    for chunk in chunks:
        chunk.layout.point_to(chunk.host_views)
    seconds = time.perf_counter() - t0
    if reuse:
        handle.state, handle.device = "parked", device
    else:
        handle = SoftUnloadHandle(chunks, device, pinned)
        _HANDLES[model] = handle
    handle.reused = reuse
    handle.last_seconds, handle.last_direction = seconds, "unload"
    if empty_cache and device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    log.info("headroom soft unload: %s", handle)
    return handle


def restore(model: nn.Module, device=None) -> SoftUnloadHandle:
    """Bring a soft-unloaded model back to ``device`` (default: where it was); one copy per flat chunk."""
    handle = _HANDLES.get(model)
    if handle is None or handle.state != "parked":
        raise ValueError(f"{type(model).__name__} is not soft-unloaded (call soft_unload(model) first)")
    device = torch.device(device) if device is not None else handle.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    t0 = time.perf_counter()
    targets = []
    for chunk in handle.chunks:
        flat = torch.empty(chunk.layout.nbytes, dtype=torch.uint8, device=device)
        flat.copy_(chunk.host, non_blocking=handle.pinned)
        targets.append(chunk.layout.views(flat))
    _sync(device)
    for chunk, views in zip(handle.chunks, targets):
        chunk.layout.point_to(views)
    handle.last_seconds, handle.last_direction = time.perf_counter() - t0, "restore"
    handle.state, handle.device = "restored", device
    log.info("headroom restore: %s", handle)
    return handle


def release_pinned(model: nn.Module) -> bool:
    """Forget the pinned copy kept for ``model`` (only while it is restored). True when one was dropped."""
    handle = _HANDLES.get(model)
    if handle is None:
        return False
    if handle.state == "parked":
        raise ValueError(f"{type(model).__name__} is parked in those buffers; restore(model) first")
    del _HANDLES[model]
    return True


def soft_unload_handle(model: nn.Module) -> SoftUnloadHandle | None:
    return _HANDLES.get(model)


# ---------------------------------------------------------------------------------------------------------------
# force unload
# ---------------------------------------------------------------------------------------------------------------

_CACHES: dict[str, Callable[[], object]] = {}


def register_cache(clear_fn: Callable[[], object], name: str | None = None) -> str:
    """Register a callback that drops a cache (force_unload calls it). Returns the name to unregister with."""
    if not callable(clear_fn):
        raise TypeError("clear_fn must be callable")
    name = name or getattr(clear_fn, "__qualname__", repr(clear_fn))
    _CACHES[name] = clear_fn
    return name


def unregister_cache(name: str) -> None:
    _CACHES.pop(name, None)


def _vram() -> dict[str, dict[str, int]]:
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": {"allocated": torch.cuda.memory_allocated(i), "reserved": torch.cuda.memory_reserved(i)}
            for i in range(torch.cuda.device_count())}


@dataclass
class ForceUnloadReport:
    before: dict[str, dict[str, int]]
    after: dict[str, dict[str, int]]
    caches_cleared: list[str] = field(default_factory=list)
    cache_errors: dict[str, str] = field(default_factory=dict)
    host_unloaded: str | None = None  # what the host application's unload hook said it did
    exception_refs_cleared: list[str] = field(default_factory=list)
    orphans_freed: int = 0
    orphan_bytes: int = 0
    orphan_modules: int = 0
    gc_collected: int = 0

    def freed_bytes(self, device: str | None = None) -> int:
        devs = [device] if device else list(self.before)
        return sum(self.before[d]["allocated"] - self.after[d]["allocated"] for d in devs)

    def as_dict(self) -> dict:
        return {**self.__dict__, "freed_bytes": self.freed_bytes() if self.before else 0}

    def __str__(self) -> str:
        if self.before:
            vram = ", ".join(f"{d} {self.before[d]['allocated'] / GB:.2f} -> {self.after[d]['allocated'] / GB:.2f} GB "
                             f"allocated ({self.before[d]['reserved'] / GB:.2f} -> {self.after[d]['reserved'] / GB:.2f} "
                             "reserved)" for d in self.before)
        else:
            vram = "no CUDA"
        extra = [f"{len(self.caches_cleared)} caches cleared"]
        if self.host_unloaded:
            extra.append(self.host_unloaded)
        if self.exception_refs_cleared:
            extra.append(f"cleared {', '.join(self.exception_refs_cleared)}")
        if self.orphans_freed:
            extra.append(f"{self.orphans_freed} orphaned tensors freed ({self.orphan_bytes / GB:.2f} GB)")
        return f"Force unload: {vram}; " + "; ".join(extra)


def clear_exception_refs(exc: BaseException | None) -> list[str]:
    """Drop references that keep the frames of a failed run (and their tensors) alive: ``sys.last_*`` and the
    tracebacks of ``exc``, of the exception being handled and of their chained causes. Returns what it cleared.

    After an OOM every tensor that was a local variable of the failed run stays allocated until its frame goes;
    force unload and the generators' OOM recovery both call this before collecting garbage."""
    cleared = []
    for attr in ("last_exc", "last_value", "last_traceback", "last_type"):
        if getattr(sys, attr, None) is not None:
            try:
                setattr(sys, attr, None)
                cleared.append(f"sys.{attr}")
            except (AttributeError, TypeError):
                pass
    seen = set()
    current = sys.exc_info()[1]
    for err in (exc, current):
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if err.__traceback__ is not None:
                traceback.clear_frames(err.__traceback__)  # locals of finished frames
                err.__traceback__ = None
                cleared.append(f"traceback of {type(err).__name__}")
            err = err.__cause__ or err.__context__
    return cleared


# Objects we never traverse when looking for what "keep" reaches: code and namespaces lead to everything.
_OPAQUE = (type, type(sys), type(len), type(_vram), type(_vram.__code__), type(sys._getframe()))


def reachable_ids(keep: Iterable[object]) -> set[int]:
    """ids of the objects reachable from ``keep`` through data (containers, instances, modules, tensors);
    types, module namespaces, functions, code and frames are not followed."""
    seen: set[int] = set()
    stack = list(keep)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
        if isinstance(obj, torch.Tensor):
            # Parameters' quant states and other attributes live in the tensor's __dict__.
            d = getattr(obj, "__dict__", None)
            if d:
                stack.append(d)
    return seen


def find_orphans(candidates: Iterable[object], keep: Iterable[object], is_target: Callable[[torch.Tensor], bool]):
    """Tensors among ``candidates`` for which ``is_target`` holds and that ``keep`` does not reach."""
    kept = reachable_ids(keep)
    return [obj for obj in candidates if isinstance(obj, torch.Tensor) and id(obj) not in kept and is_target(obj)]


def free_tensors(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Replace each tensor's storage with an empty CPU tensor of its dtype; returns (count, bytes)."""
    count = nbytes = 0
    for t in tensors:
        try:
            size = tensor_nbytes(t)
            t.data = torch.empty(0, dtype=t.dtype, device="cpu")
        except RuntimeError as err:  # e.g. a tensor subclass that refuses .data assignment
            log.debug("could not free a %s tensor: %s", type(t).__name__, err)
            continue
        count += 1
        nbytes += size
    return count, nbytes


def force_unload(keep: Iterable[object] = (), exc: BaseException | None = None,
                 nuke_orphaned_tensors: bool = False, host_unload: Callable[[], str | None] | None = None,
                 gc_passes: int = 3) -> ForceUnloadReport:
    """Give VRAM back, also after an OOM.

    1. call every registered cache-clear callback (:func:`register_cache`);
    2. ``host_unload``: the host application's own unload (the ComfyUI glue passes one that asks ComfyUI's
       model management to unload everything); it returns what it did, for the report, or None;
    3. clear ``sys.last_exc/last_value/last_traceback/last_type`` and the frames of ``exc`` (and of the
       exception being handled, and their chained causes) - an OOM's traceback pins every tensor that was a
       local variable in the failed run;
    4. ``nuke_orphaned_tensors=True``: walk ``gc.get_objects()`` for CUDA tensors that nothing in ``keep``
       reaches and replace their storage with an empty CPU tensor (modules holding them keep their structure
       but lose their weights). RISKS: everything not reachable from ``keep`` through data is destroyed -
       other nodes' models, tensors cached by libraries, live :class:`BlockStreamer` rings; the keep
       traversal does not follow functions/closures/module globals. Use it after an OOM, when the models
       are going to be reloaded anyway;
    5. ``gc_passes`` garbage collections, ``torch.cuda.empty_cache()``, ``torch.cuda.ipc_collect()``.
    """
    report = ForceUnloadReport(before=_vram(), after={})
    for name, clear in list(_CACHES.items()):
        try:
            clear()
            report.caches_cleared.append(name)
        except Exception as err:
            report.cache_errors[name] = f"{type(err).__name__}: {err}"
            log.warning("headroom force unload: cache %s failed to clear: %s", name, err)
    if host_unload is not None:
        try:
            report.host_unloaded = host_unload()
        except Exception as err:
            log.warning("headroom force unload: the host's unload failed: %s", err)
    report.exception_refs_cleared = clear_exception_refs(exc)
    exc = None  # our own reference must not pin the frames either
    for _ in range(gc_passes):
        report.gc_collected += gc.collect()
    if nuke_orphaned_tensors and torch.cuda.is_available():
        keep = list(keep)
        orphans = find_orphans(gc.get_objects(), keep, lambda t: t.device.type == "cuda")
        orphan_ids = {id(t) for t in orphans}
        owners = {id(m) for m in gc.get_objects() if isinstance(m, nn.Module)
                  and any(id(t) in orphan_ids for t in list(m._parameters.values()) + list(m._buffers.values()))}
        report.orphan_modules = len(owners)
        report.orphans_freed, report.orphan_bytes = free_tensors(orphans)
        del orphans
        for _ in range(gc_passes):
            report.gc_collected += gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    report.after = _vram()
    log.info("headroom: %s", report)
    return report
