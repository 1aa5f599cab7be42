"""Every tensor a module's forward needs, and a flat byte layout to move them in one piece.

Streaming and soft unload both move a module's weights between a host buffer and a device buffer and then
re-point the module at views of that buffer (``param.data = view`` / ``module._buffers[name] = view``), so
the modules, their ``Parameter`` objects and any hooks on them stay the same objects.

What counts as a module's tensors:

* parameters and buffers (``Int8Linear``: ``weight`` int8 + ``weight_scale`` fp32 buffers, ``bias`` param;
  bf16 / fp16 / fp32 layers);
* bitsandbytes 4-bit (NF4 / FP4) ``Params4bit`` weights *and* the tensors of their ``quant_state``
  (``absmax``, ``code``, ``offset`` and the nested ``state2`` tensors).

Not supported (a clear error is raised): bitsandbytes LLM.int8 ``Linear8bitLt`` / ``Int8Params`` (their
``CB``/``SCB`` live in several aliased places). Plain tensor attributes that a module keeps outside its
parameters/buffers are not moved.
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


def collect_tensor_refs(module: nn.Module, prefix: str = "") -> list[TensorRef]:
    """All tensors of ``module`` (recursively), each once, in a stable order."""
    refs: list[TensorRef] = []
    seen_tensors: set[int] = set()
    seen_states: set[int] = set()
    for mod_name, mod in module.named_modules(prefix=prefix):
        if is_bnb_int8(mod):
            raise UnsupportedModuleError(
                f"{mod_name or type(module).__name__}: bitsandbytes LLM.int8 layers (Linear8bitLt) cannot be "
                "streamed or soft-unloaded; convert the model to our Int8Linear (headroom convert) or use NF4")
        for attr, param in mod._parameters.items():
            if param is None or id(param) in seen_tensors:
                continue
            seen_tensors.add(id(param))
            name = f"{mod_name}.{attr}" if mod_name else attr
            refs.append(TensorRef(mod, attr, "param", name))
            refs += _quant_state_refs(param.__dict__.get("quant_state"), name, seen_states)
        for attr, buf in mod._buffers.items():
            if buf is None or id(buf) in seen_tensors:
                continue
            seen_tensors.add(id(buf))
            refs.append(TensorRef(mod, attr, "buffer", f"{mod_name}.{attr}" if mod_name else attr))
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
        once and cached, so replacing a module's Parameter object afterwards is not seen."""
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
