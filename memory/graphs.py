"""CUDA graphs for transformer blocks: replay a block's recorded kernels instead of issuing them one by one.

Why: a 24-block model at 4096 tokens issues ~500 kernels per step from Python. On our H100 machines the host's
speed varies up to 2.2x between processes (docs/PERFORMANCE.md, "## Memory"), and an INT8 model, with more
launches per layer than bf16, then becomes CPU bound: its step time equals the CPU time to issue it, and block
streaming misses its bound. A replayed graph costs the host a few microseconds per block, however many
kernels it holds.

How (:func:`graph_blocks`): each block's ``forward`` is replaced by a :class:`GraphedForward`. A call is keyed
by its input signature (shapes, dtypes, devices of the tensor arguments; other positional arguments by value)
and by ``slot_of()``: for a streamed block, the ring slot its weights sit in (their addresses), None for a
resident one. The first call of a key runs eagerly (the warm-up: Triton compiles, cuDNN plans, lazy buffers);
the second is captured into a ``torch.cuda.CUDAGraph`` and replayed; later calls copy their inputs into static
buffers, replay and return copies of the static outputs. Static input and output buffers are shared by every
block with the same signature (blocks run one after another), and all graphs share one memory pool for their
intermediates, so graphing 24 blocks costs about one block's activations, not 24.

Limits: inference only (no autograd through a graph); outputs must be a tensor or a tuple/list of tensors;
calls with keyword arguments or unhashable positional arguments run eagerly; a block whose capture fails (a
host synchronisation inside it, say ``HEADROOM_DEBUG=1``'s NaN check) runs eagerly from then on (logged
once); ``kernels.kernel_summary()`` counts a graphed layer once, at capture, not per replay.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("comfyui_headroom")

_EAGER = object()  # a key whose capture failed, or that cannot be graphed


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.shape, t.dtype, t.device, t.is_contiguous())


def _outputs(out) -> tuple[list[torch.Tensor], type | None]:
    """(the output tensors, the container type to rebuild; None for a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out), type(out)
    raise TypeError(f"a graphed block must return a tensor or a tuple/list of tensors, got {type(out).__name__}")


class _Shared:
    """What the graphed blocks of one model share: the memory pool and the static buffers per signature."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.inputs: dict = {}
        self.outputs: dict = {}

    def buffers(self, store: dict, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple(_tensor_key(t) for t in tensors)
        bufs = store.get(key)
        if bufs is None:
            bufs = store[key] = [torch.empty_like(t) for t in tensors]
        return bufs


class GraphedForward:
    """Stands in for one block's ``forward`` (see the module docstring)."""

    def __init__(self, block: nn.Module, name: str, shared: _Shared, slot_of=None):
        self.block = block
        self.name = name
        self.eager = block.forward  # the bound original
        self.shared = shared
        self.slot_of = slot_of
        self.graphs: dict = {}  # key -> (CUDAGraph, static inputs, static outputs, container) | _EAGER
        self.seen: set = set()  # keys run once eagerly (warmed up)
        self.replays = 0

    def _key(self, args):
        parts = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if not a.is_cuda:
                    return None
                parts.append(_tensor_key(a))
            else:
                try:
                    hash(a)
                except TypeError:
                    return None
                parts.append((type(a), a))
        return (self.slot_of() if self.slot_of is not None else None, tuple(parts))

    def __call__(self, *args, **kwargs):
        if kwargs or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return self.eager(*args, **kwargs)
        key = self._key(args)
        if key is None:
            return self.eager(*args)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # warm-up call: eager
                self.seen.add(key)
                return self.eager(*args)
            entry = self._capture(key, args)
        if entry is _EAGER:
            return self.eager(*args)
        graph, static_in, static_out, container = entry
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for buf, t in zip(static_in, tensors):
            buf.copy_(t)
        graph.replay()
        self.replays += 1
        outs = [o.clone() for o in static_out]
        return outs[0] if container is None else container(outs)

    def _capture(self, key, args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        static_in = self.shared.buffers(self.shared.inputs, tensors)
        it = iter(static_in)
        static_args = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        for buf, t in zip(static_in, tensors):
            buf.copy_(t)
        try:
            # Output shapes come from a run on the static inputs (also a second warm-up), so the static output
            # buffers exist before the capture and outlive it.
            sample, container = _outputs(self.eager(*static_args))
            static_out = self.shared.buffers(self.shared.outputs, sample)
            del sample
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.shared.pool):
                outs, _ = _outputs(self.eager(*static_args))
                for buf, o in zip(static_out, outs):
                    buf.copy_(o)
                del outs
        except Exception as err:  # noqa: BLE001 - any capture failure: this key runs eagerly from now on
            log.warning("headroom: block %s runs without a CUDA graph (%s: %s)", self.name, type(err).__name__, err)
            self.graphs[key] = _EAGER
            return _EAGER
        entry = (graph, static_in, static_out, container)
        self.graphs[key] = entry
        return entry


class BlockGraphs:
    """The graphed blocks of one model; ``remove()`` puts their own ``forward`` back and frees the graphs."""

    def __init__(self, forwards: list[GraphedForward]):
        self.forwards = forwards

    @property
    def replays(self) -> int:
        return sum(f.replays for f in self.forwards)

    @property
    def graph_count(self) -> int:
        return sum(1 for f in self.forwards for e in f.graphs.values() if e is not _EAGER)

    def remove(self) -> None:
        for f in self.forwards:
            if f.block.__dict__.get("forward") is f:
                del f.block.__dict__["forward"]
            f.graphs.clear()
        self.forwards = []


def graph_blocks(blocks: list[nn.Module], names: list[str] | None = None, slot_of=None) -> BlockGraphs:
    """Replay each of ``blocks`` from CUDA graphs (module docstring). ``slot_of(i)`` -> the ring slot of block
    ``i`` (block streaming passes it; None: every block's weights stay where they are)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    names = names or [f"block {i}" for i in range(len(blocks))]
    shared = _Shared()
    forwards = []
    for i, (block, name) in enumerate(zip(blocks, names)):
        fwd = GraphedForward(block, name, shared, (lambda i=i: slot_of(i)) if slot_of is not None else None)
        block.forward = fwd  # instance attribute: nn.Module.__call__ (and its hooks) calls it
        forwards.append(fwd)
    return BlockGraphs(forwards)
