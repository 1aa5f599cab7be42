"""``Int8Linear``: THE INT8 linear layer of every road - a drop-in ``nn.Linear`` holding an int8 weight and
float32 scales. The demo, the converter's checks and ``quantize_model`` use it as it is; the ComfyUI road
subclasses it only to take part in ComfyUI's layer machinery (integrations/comfyui/ops.py: its load-time
decision and weight casting) and runs the same :meth:`Int8Linear.int8_forward`.

* state_dict keys: ``weight`` (int8 ``[out, in]``), ``weight_scale`` (float32), ``bias`` (compute dtype);
  the granularity (rowwise/block/tensorwise) is read back from the scale's shape on load.
* ``.to(device)`` moves everything; ``.to(dtype)`` casts only the bias - the int8 weight and the float32
  scale keep their dtypes, so a ``model.to(torch.bfloat16)`` never destroys the quantization.
* forward goes through :func:`comfyui_headroom.kernels.int8_linear` (the dispatcher), plus optional
  float LoRA side branches ``scale * (x A^T) B^T`` that never touch the int8 weight (:mod:`.lora`).
* ``rotation_group`` > 0: the weight is stored Hadamard-rotated (``Q(W H)``, see :mod:`.rotation`); forward
  rotates the input first, ``dequantized_weight()`` un-rotates. The state dict then gains ``rotation_group``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import int8_linear
from ..kernels.dispatch import choose_kernel, choose_kernel_while_tracing, int8_linear_int8_input
from ..kernels.hadamard import rotated_int8_linear
from ..kernels.int8 import (
    DEFAULT_BLOCK_SIZE,
    block_size_of,
    method_of_scale,
    normalise_scale,
    quantize_weight,
    scale_shape,
)
from ..kernels.rotation import check_group, dequantize_unrotated, quantize_rotated, rotation_fits
from .lora import apply_side_branches


class Int8Linear(nn.Module):
    """Linear layer with a symmetric INT8 weight (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: str = "rowwise",
        block_size: int = DEFAULT_BLOCK_SIZE,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", self._empty_scale(method, device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Float LoRA side branches: (down [r, in], up [out, r], scale). Not part of the state dict.
        self.lora: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.rotation_group = 0  # > 0: weight holds Q(W H) with H a block Hadamard of this size (quant/rotation.py)

    def _empty_scale(self, method: str, device) -> torch.Tensor:
        shape = scale_shape(method, self.out_features, self.in_features, self.block_size)
        return torch.ones(shape, dtype=torch.float32, device=device)

    @property
    def method(self) -> str:
        return method_of_scale(self.weight_scale, self.out_features)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "rowwise",
        block_size: int = DEFAULT_BLOCK_SIZE,
        compute_dtype: torch.dtype | None = None,
        rotation_group: int = 0,
    ) -> "Int8Linear":
        """Quantize an existing ``nn.Linear`` (on whatever device it lives); ``rotation_group`` > 0 rotates first."""
        weight = linear.weight.detach()
        compute_dtype = compute_dtype or (weight.dtype if weight.dtype != torch.float32 else torch.bfloat16)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            method=method,
            block_size=block_size,
            compute_dtype=compute_dtype,
            device="meta",
        )
        if rotation_group:
            q, scale = quantize_rotated(weight, rotation_group, method, block_size)
            layer.rotation_group = rotation_group
        else:
            q, scale = quantize_weight(weight, method, block_size)
        layer.weight = q
        layer.weight_scale = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).clone(), requires_grad=False)
        return layer

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        compute_dtype: torch.dtype = torch.bfloat16,
        rotation_group: int = 0,
    ) -> "Int8Linear":
        """Wrap already-quantized tensors (read from a file) without copying them.

        ``rotation_group`` > 0 says the int8 weight is Hadamard-rotated (ComfyUI ``convrot``).
        """
        if weight.dtype != torch.int8 or weight.ndim != 2:
            raise ValueError(f"expected an int8 [out, in] weight, got {weight.dtype} {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, block_size=block_size,
                    compute_dtype=compute_dtype, device="meta")
        layer.weight = weight
        layer.weight_scale = normalise_scale(weight_scale, (out_features, in_features))
        if layer.method == "block":
            layer.block_size = block_size_of(in_features, layer.weight_scale, block_size)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        if rotation_group:
            layer._set_rotation(rotation_group)
        return layer

    def _set_rotation(self, group: int) -> None:
        if group and not rotation_fits(self.in_features, check_group(group)):
            raise ValueError(f"rotation group {group} does not divide in_features={self.in_features}")
        self.rotation_group = int(group)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in the plain basis (un-rotated when the layer is rotated)."""
        return dequantize_unrotated(self.weight, self.weight_scale, self.rotation_group, dtype, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8_forward(x, self.weight, self.weight_scale, self.bias)

    def int8_forward(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's function on ``x`` with these tensors (this layer's own, or copies a caller brought to
        ``x``'s device): the INT8 GEMM through the dispatcher - with the input rotated first when the weight
        is stored rotated - plus the float LoRA side branches."""
        if self.rotation_group:  # the weight lives in the rotated basis: the input is rotated to match
            y = rotated_int8_linear(x, weight, scale, bias, self.block_size, self.rotation_group)
        else:
            y = int8_linear(x, weight, scale, bias, self.block_size)
        if self.lora:
            y = apply_side_branches(x, y, self.lora)
        return y

    def takes_int8_input(self, x: torch.Tensor) -> bool:
        """True when this layer would run ``x``'s rows through a W8A8 GEMM (Triton or ``_int_mm``) with
        nothing else needing the float input: no LoRA branch, no rotation, no gradient. Then a producer
        (:mod:`comfyui_headroom.kernels.producers`) may hand it INT8 rows for :meth:`forward_int8`.
        Inside ``torch.compile`` the same answer comes from the call's static facts (device, rows, weight and
        scale shapes, forced kernel), so the decision neither breaks the graph nor differs from eager."""
        if self.lora or self.rotation_group or self.weight_scale is None:
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False
        choose = choose_kernel_while_tracing if torch.compiler.is_compiling() else choose_kernel
        return choose(x, self.weight, self.weight_scale) in ("triton_w8a8", "int_mm")

    def forward_int8(self, rows, out_dtype: torch.dtype) -> torch.Tensor:
        """The layer on an input that a producer (:mod:`comfyui_headroom.kernels.producers`) already wrote in
        INT8: ``rows`` = ``(q int8 [M, K], scale float32 [M])`` -> ``[M, out]`` in ``out_dtype``. Only the GEMM
        runs; callers check :meth:`takes_int8_input` first (no LoRA, no rotation: both need the float input).
        Under ``torch.compile`` the GEMM is the custom op ``headroom::int8_linear_int8_input``."""
        if self.lora or self.rotation_group:
            raise ValueError("forward_int8: this layer has LoRA branches or a rotated weight, which need the float "
                             "input; call the layer on the float activation instead")
        q, a_scale = rows  # shapes, dtypes and devices are checked where the kernel is chosen
        return int8_linear_int8_input(q, a_scale, self.weight, self.weight_scale, self.bias, out_dtype,
                                      self.block_size)

    def _apply(self, fn, recurse=True):
        # Keep int8 weight and float32 scale dtypes under .to(dtype)/.half(); follow device moves.
        if self._buffers.get("weight_scale") is None:  # a ComfyUI-road layer that stayed float
            return super()._apply(fn, recurse)
        scale = self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(scale)
            self._buffers["weight_scale"] = moved if moved.dtype == torch.float32 else scale.to(moved.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.rotation_group:  # optional key: only rotated layers carry it
            destination[prefix + "rotation_group"] = torch.tensor(self.rotation_group, dtype=torch.int32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        rotation = state_dict.pop(prefix + "rotation_group", None)
        if prefix + "weight" in state_dict:  # the incoming weight says which basis it is in
            self._set_rotation(int(rotation) if rotation is not None else 0)
        # Accept any scale layout: resize our buffer to the incoming one before the copy.
        key = prefix + "weight_scale"
        if key in state_dict:
            incoming = normalise_scale(state_dict[key], (self.out_features, self.in_features), key)
            state_dict[key] = incoming
            if incoming.shape != self.weight_scale.shape:
                self.weight_scale = torch.empty_like(incoming, device=self.weight_scale.device)
                if incoming.ndim == 2:
                    self.block_size = block_size_of(self.in_features, incoming, self.block_size)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        extra = f", block_size={self.block_size}" if self.method == "block" else ""
        extra += f", rotation_group={self.rotation_group}" if self.rotation_group else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method}{extra}")


def int8_layers(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    """``(name, layer)`` for every :class:`Int8Linear` of ``model`` that holds an INT8 weight (on the ComfyUI
    road a layer that the load kept float is an ``Int8Linear`` subclass without a scale)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear) and m.weight_scale is not None]


def takes_int8_input(layer, x: torch.Tensor) -> bool:
    """Whether ``layer`` is an :class:`Int8Linear` that can take a producer's INT8 rows for ``x``
    (:meth:`Int8Linear.takes_int8_input`); False for any other module."""
    return isinstance(layer, Int8Linear) and layer.takes_int8_input(x)
