"""Every tensor a module's forward needs, and a flat byte layout to move them in one piece.

Streaming and soft unload both move a module's weights between a host buffer and a device buffer and then
re-point the module at views of that buffer (``param.data = view`` / ``module._buffers[name] = view``), so
the modules, their ``Parameter`` objects and any hooks on them stay the same objects.

What counts as a module's tensors:

* parameters and buffers (``Int8Linear``: ``weight`` int8 + ``weight_scale`` fp32 buffers, ``bias`` param;
  bf16 / fp16 / fp32 layers);
* bitsandbytes 4-bit (NF4 / FP4) ``Params4bit`` weights *and* the tensors of their ``quant_state``
  (``absmax``, ``code``, ``offset`` and the nested ``state2`` tensors);
* bitsandbytes LLM.int8 (``Linear8bitLt`` / ``Int8Params``), only when the caller asks
  (``collect_tensor_refs(..., bnb_int8=True)``, what soft unload does): the row scales ``SCB`` (on the weight
  before the first forward, on ``layer.state`` after it), and the weight's aliases ``weight.CB`` /
  ``state.CB``, which follow the weight wherever it is re-pointed. Streaming refuses these layers with a clear
  error: its hot path (:meth:`FlatLayout.fast_point_to`) does not follow aliases.

Plain tensor attributes that a module keeps outside its parameters/buffers are not moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant.bnb_layers import is_bnb_int8

ALIGN = 256  # bytes; every tensor starts at a multiple of this inside a flat buffer


class UnsupportedModuleError(TypeError):
    """A module holds tensors that the memory tools cannot relocate safely."""


@dataclass
class TensorRef:
    """Where one tensor lives on a module (or a bitsandbytes QuantState) and how to re-point it."""

    owner: object
    attr: str
    kind: str  # "param" | "buffer" | "attr"
    name: str  # dotted name, for messages
    aliases: tuple = ()  # (owner, attr) pairs holding this same tensor (LLM.int8's CB): re-pointed with it

    def get(self) -> torch.Tensor:
        if self.kind == "param":
            return self.owner._parameters[self.attr]
        if self.kind == "buffer":
            return self.owner._buffers[self.attr]
        return getattr(self.owner, self.attr)

    def set(self, tensor: torch.Tensor) -> None:
        if self.kind == "param":
            # Keep the Parameter object (and its subclass, e.g. Params4bit): swap only its data.
            self.owner._parameters[self.attr].data = tensor
        elif self.kind == "buffer":
            self.owner._buffers[self.attr] = tensor
        else:
            setattr(self.owner, self.attr, tensor)
        for owner, attr in self.aliases:
            if getattr(owner, attr, None) is not None:  # an alias that is unset now stays unset
                setattr(owner, attr, tensor)


def _quant_state_refs(quant_state, prefix: str, seen: set[int]) -> list[TensorRef]:
    if quant_state is None or id(quant_state) in seen:
        return []
    seen.add(id(quant_state))
    refs = []
    for attr in ("absmax", "code", "offset"):
        if isinstance(getattr(quant_state, attr, None), torch.Tensor):
            refs.append(TensorRef(quant_state, attr, "attr", f"{prefix}.quant_state.{attr}"))
    refs += _quant_state_refs(getattr(quant_state, "state2", None), prefix + ".quant_state.state2", seen)
    return refs


def _int8_weight_aliases(layer: nn.Module) -> tuple:
    """Where LLM.int8 holds its int8 weight a second time: ``weight.CB`` until the first forward, ``state.CB``
    after it (and each forward copies ``state.CB`` back into ``weight.data``, so a stale one would undo a move)."""
    owners = [layer.weight, getattr(layer, "state", None)]
    return tuple((owner, "CB") for owner in owners if owner is not None)


def _int8_scale_refs(layer: nn.Module, prefix: str, seen: set[int]) -> list[TensorRef]:
    """LLM.int8's row scales ``SCB``: on the weight until the first forward, on ``layer.state`` after it; one
    tensor held by both is one ref whose alias follows it."""
    weight_scb = getattr(layer.weight, "SCB", None)
    state = getattr(layer, "state", None)
    state_scb = getattr(state, "SCB", None)
    refs = []
    if isinstance(weight_scb, torch.Tensor) and id(weight_scb) not in seen:
        seen.add(id(weight_scb))
        aliases = ((state, "SCB"),) if state_scb is weight_scb else ()
        refs.append(TensorRef(layer.weight, "SCB", "attr", f"{prefix}weight.SCB", aliases))
    if isinstance(state_scb, torch.Tensor) and id(state_scb) not in seen:
        seen.add(id(state_scb))
        refs.append(TensorRef(state, "SCB", "attr", f"{prefix}state.SCB"))
    return refs


def collect_tensor_refs(module: nn.Module, prefix: str = "", *, bnb_int8: bool = False) -> list[TensorRef]:
    """All tensors of ``module`` (recursively), each once, in a stable order.

    ``bnb_int8=True``: bitsandbytes LLM.int8 layers too (see the module docstring; soft unload asks for them);
    without it they raise :class:`UnsupportedModuleError`."""
    refs: list[TensorRef] = []
    seen_tensors: set[int] = set()
    seen_states: set[int] = set()
    for mod_name, mod in module.named_modules(prefix=prefix):
        int8 = is_bnb_int8(mod)
        if int8 and not bnb_int8:
            raise UnsupportedModuleError(
                f"{mod_name or type(module).__name__}: bitsandbytes LLM.int8 layers (Linear8bitLt) cannot be "
                "streamed or split across devices; convert the model to our Int8Linear (headroom convert) or use NF4")
        for attr, param in mod._parameters.items():
            if param is None or id(param) in seen_tensors:
                continue
            seen_tensors.add(id(param))
            name = f"{mod_name}.{attr}" if mod_name else attr
            aliases = _int8_weight_aliases(mod) if int8 and attr == "weight" else ()
            refs.append(TensorRef(mod, attr, "param", name, aliases))
            refs += _quant_state_refs(param.__dict__.get("quant_state"), name, seen_states)
        for attr, buf in mod._buffers.items():
            if buf is None or id(buf) in seen_tensors:
                continue
            seen_tensors.add(id(buf))
            refs.append(TensorRef(mod, attr, "buffer", f"{mod_name}.{attr}" if mod_name else attr))
        if int8:
            refs += _int8_scale_refs(mod, f"{mod_name}." if mod_name else "", seen_tensors)
    return refs


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of every tensor the module needs (parameters, buffers, 4-bit quant states)."""
    return sum(tensor_nbytes(ref.get()) for ref in collect_tensor_refs(module))


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class FlatLayout:
    """Offsets of a list of tensors packed into one uint8 buffer (each aligned to ``ALIGN`` bytes)."""

    def __init__(self, refs: list[TensorRef]):
        self.refs = refs
        self.shapes: list[torch.Size] = []
        self.dtypes: list[torch.dtype] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        offset = 0
        for ref in refs:
            tensor = ref.get()
            if tensor.device.type == "meta":
                raise ValueError(f"{ref.name} is on the meta device (no data): load the weights before moving them")
            size = tensor_nbytes(tensor)
            self.shapes.append(tensor.shape)
            self.dtypes.append(tensor.dtype)
            self.offsets.append(offset)
            self.sizes.append(size)
            offset = _align(offset + size)
        self.nbytes = max(offset, ALIGN)

    def matches(self, refs: list[TensorRef]) -> bool:
        """True when ``refs`` still have the shapes/dtypes this layout was built for (buffers reusable)."""
        if len(refs) != len(self.refs):
            return False
        for ref, shape, dtype in zip(refs, self.shapes, self.dtypes):
            tensor = ref.get()
            if tensor.shape != shape or tensor.dtype != dtype:
                return False
        return True

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views into ``flat`` (uint8), one per tensor, in ``refs`` order."""
        out = []
        for offset, size, shape, dtype in zip(self.offsets, self.sizes, self.shapes, self.dtypes):
            out.append(flat[offset:offset + size].view(dtype).view(shape))
        return out

    def pack(self, flat: torch.Tensor, non_blocking: bool = False) -> list[torch.Tensor]:
        """Copy the current tensors into ``flat``; returns the views (not yet re-pointed)."""
        views = self.views(flat)
        for ref, view in zip(self.refs, views):
            view.copy_(ref.get().detach(), non_blocking=non_blocking)
        return views

    def point_to(self, views: list[torch.Tensor]) -> None:
        for ref, view in zip(self.refs, views):
            ref.set(view)

    def fast_point_to(self, views: list[torch.Tensor]) -> None:
        """``point_to`` for hot paths (block streaming): the Parameter objects and buffer dicts are looked up
        once and cached, so replacing a module's Parameter object afterwards is not seen. Aliases are not
        followed (streaming never collects LLM.int8 layers, the only ones that have them)."""
        targets = self.__dict__.get("_targets")
        if targets is None:
            targets = []
            for ref in self.refs:
                if ref.kind == "param":
                    targets.append((0, ref.owner._parameters[ref.attr], None))
                elif ref.kind == "buffer":
                    targets.append((1, ref.owner._buffers, ref.attr))
                else:
                    targets.append((2, ref.owner, ref.attr))
            self._targets = targets
        for (kind, obj, key), view in zip(targets, views):
            if kind == 0:
                obj.data = view
            elif kind == 1:
                obj[key] = view
            else:
                setattr(obj, key, view)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def empty_host(nbytes: int, pin_memory: bool) -> torch.Tensor:
    """A uint8 host buffer; pinned (page-locked) when asked - only possible with CUDA."""
    if pin_memory and not cuda_available():
        raise RuntimeError("pinned host memory needs CUDA; pass pin_memory=False on a CPU-only machine")
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
