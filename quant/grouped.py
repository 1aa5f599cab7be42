"""Grouped linear layers: the E experts of a Mixture-of-Experts projection stacked into one ``[E, out, in]`` tensor.

Why: a MoE layer (HunyuanImage-3: 64 experts, top-8) multiplies a few hundred rows per expert. As 64 separate
``nn.Linear`` calls that is 64 small GEMMs and 64 launches per projection; stacked, the rows sorted by expert run
as ONE grouped GEMM (:mod:`comfyui_headroom.kernels.grouped`) whose ``group_offsets`` say which rows belong to
which expert. Two flavours, one interface (``forward_sorted``):

* :class:`Int8GroupedLinear` - row-wise W8A8: int8 ``weight [E, out, in]`` + float32 ``weight_scale [E, out]``;
  the activation rows are quantized once per token and gathered inside the kernel (``row_index``);
* :class:`GroupedLinear` - the float (bf16) stack, run by ``torch._grouped_mm`` where it exists, else a loop.

LoRA: per expert, float side branches ``scale * (x A^T) B^T`` (``lora[e]``, the :mod:`.lora` branch tuples), added
on that expert's rows; the int8 weight is never touched, so a strength change needs no reload.
No bias: the MoE experts this serves have none (Tencent's ``mlp_bias=False``); a bias is refused when stacking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..kernels.grouped import (
    grouped_float_linear,
    grouped_int8_linear,
    quantize_token_rows,
)
from ..kernels.int8 import quantize_weight
from .lora import Branch, apply_side_branches


def _stack_shapes(linears: Sequence[nn.Module], what: str) -> tuple[int, int]:
    if not linears:
        raise ValueError(f"{what}: no layers to stack")
    shapes = {(m.out_features, m.in_features) for m in linears}
    if len(shapes) != 1:
        raise ValueError(f"{what}: the experts' layers differ in shape {sorted(shapes)}; they cannot be stacked")
    if any(getattr(m, "bias", None) is not None for m in linears):
        raise ValueError(f"{what}: an expert layer has a bias; grouped layers take bias-free experts only")
    return shapes.pop()


class _GroupedBase(nn.Module):
    """What both flavours share: the sizes, the LoRA side branches per expert, host offsets only when needed."""

    def __init__(self, num_groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.in_features = in_features
        self.out_features = out_features
        # expert index -> float side branches (down [r, in], up [out, r], scale); not part of the state dict
        self.lora: dict[int, list[Branch]] = {}

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, group_offsets: torch.Tensor,
                  row_index: torch.Tensor | None) -> torch.Tensor:
        """Each expert's side branches on its own rows (reads the offsets on the host: LoRA runs only)."""
        bounds = group_offsets.tolist()
        for expert, branches in self.lora.items():
            start, end = bounds[expert], bounds[expert + 1]
            if end <= start or not branches:
                continue
            rows = x[row_index[start:end]] if row_index is not None else x[start:end]
            y[start:end] = apply_side_branches(rows, y[start:end], branches)
        return y

    def extra_repr(self) -> str:
        lora = f", lora_experts={len(self.lora)}" if self.lora else ""
        return f"groups={self.num_groups}, in_features={self.in_features}, out_features={self.out_features}{lora}"


class GroupedLinear(_GroupedBase):
    """E float linear layers stacked: ``weight [E, out, in]`` in the compute dtype."""

    def __init__(self, num_groups: int, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 device=None) -> None:
        super().__init__(num_groups, in_features, out_features)
        self.weight = nn.Parameter(torch.empty(num_groups, out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Module], what: str = "experts") -> "GroupedLinear":
        out_features, in_features = _stack_shapes(linears, what)
        first = linears[0].weight
        layer = cls(len(linears), in_features, out_features, dtype=first.dtype, device="meta")
        layer.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]), requires_grad=False)
        return layer

    def expert_weight(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight[expert].to(dtype)

    def forward_sorted(self, x: torch.Tensor, group_offsets: torch.Tensor,
                       row_index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` rows (or ``x[row_index]``) sorted by expert, ``group_offsets [E + 1]`` -> ``[rows, out]``."""
        rows = x[row_index] if row_index is not None else x
        y = grouped_float_linear(rows.to(self.weight.dtype), self.weight, group_offsets)
        return self._add_lora(x, y, group_offsets, row_index) if self.lora else y


class Int8GroupedLinear(_GroupedBase):
    """E row-wise INT8 linear layers stacked: int8 ``weight [E, out, in]`` + float32 ``weight_scale [E, out]``.

    ``.to(dtype)`` leaves both alone (as :class:`~comfyui_headroom.quant.linear.Int8Linear` does)."""

    def __init__(self, num_groups: int, in_features: int, out_features: int, device=None) -> None:
        super().__init__(num_groups, in_features, out_features)
        self.register_buffer("weight", torch.zeros(num_groups, out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(num_groups, out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Module], what: str = "experts") -> "Int8GroupedLinear":
        """Quantize float experts (row-wise) into one stack; each is quantized where it lives."""
        out_features, in_features = _stack_shapes(linears, what)
        layer = cls(len(linears), in_features, out_features, device="meta")
        device = linears[0].weight.device
        layer.weight = torch.empty(len(linears), out_features, in_features, dtype=torch.int8, device=device)
        layer.weight_scale = torch.empty(len(linears), out_features, dtype=torch.float32, device=device)
        for expert, linear in enumerate(linears):
            layer.set_expert(expert, linear.weight.detach())
        return layer

    @classmethod
    def empty(cls, num_groups: int, in_features: int, out_features: int, device) -> "Int8GroupedLinear":
        """Uninitialised storage that a loader fills expert by expert (:meth:`set_expert`)."""
        layer = cls(num_groups, in_features, out_features, device="meta")
        layer.weight = torch.empty(num_groups, out_features, in_features, dtype=torch.int8, device=device)
        layer.weight_scale = torch.empty(num_groups, out_features, dtype=torch.float32, device=device)
        return layer

    def set_expert(self, expert: int, weight: torch.Tensor, weight_scale: torch.Tensor | None = None) -> None:
        """Fill one expert: a float weight is quantized row-wise; an int8 one comes with its ``[out]`` scale."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expert {expert}: weight {tuple(weight.shape)}, this stack holds "
                             f"[{self.out_features}, {self.in_features}]")
        if weight.dtype == torch.int8:
            if weight_scale is None or weight_scale.numel() != self.out_features:
                raise ValueError(f"expert {expert}: an int8 weight needs its row-wise scale of {self.out_features} "
                                 f"values, got {None if weight_scale is None else tuple(weight_scale.shape)}")
            q, scale = weight, weight_scale.reshape(-1).float()
        else:
            q, scale = quantize_weight(weight.to(self.weight.device), "rowwise")
        with torch.no_grad():
            self.weight[expert].copy_(q)
            self.weight_scale[expert].copy_(scale.reshape(-1))

    def expert_weight(self, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``expert``'s dequantized weight ``[out, in]``."""
        return (self.weight[expert].float() * self.weight_scale[expert][:, None]).to(dtype)

    def forward_sorted(self, x: torch.Tensor, group_offsets: torch.Tensor,
                       row_index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` float ``[T, in]``; output row m is expert e's projection of ``x[row_index[m]]`` (or ``x[m]``) for
        ``group_offsets[e] <= m < group_offsets[e + 1]``. ``x`` is quantized once per row, before the gather."""
        q, scale = quantize_token_rows(x)
        y = self.forward_sorted_int8(q, scale, group_offsets, row_index, x.dtype)
        return self._add_lora(x, y, group_offsets, row_index) if self.lora else y

    def forward_sorted_int8(self, q: torch.Tensor, scale: torch.Tensor, group_offsets: torch.Tensor,
                            row_index: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                            out_row_index: torch.Tensor | None = None) -> torch.Tensor:
        """The grouped GEMM on rows a producer already wrote in INT8 (no LoRA: it needs the float rows);
        ``out_row_index`` stores row m at ``out[out_row_index[m]]`` (back in token order, no un-sorting copy)."""
        return grouped_int8_linear(q, scale, self.weight, self.weight_scale, group_offsets, row_index=row_index,
                                   out_dtype=out_dtype, out_row_index=out_row_index)

    def _apply(self, fn, recurse=True):
        # int8 weight and float32 scale keep their dtypes under .to(dtype); device moves apply to both.
        weight, scale = self._buffers.pop("weight"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            moved_w, moved_s = fn(weight), fn(scale)
            self._buffers["weight"] = moved_w if moved_w.dtype == torch.int8 else weight.to(moved_w.device)
            self._buffers["weight_scale"] = moved_s if moved_s.dtype == torch.float32 else scale.to(moved_s.device)
        return self
