"""The four ways to compute an INT8 linear, as plain functions with one signature.

``fn(x [..., K], weight int8 [N, K], weight_scale fp32, bias | None, block_size) -> [..., N] in x.dtype``

* ``triton_w8a8``  - Triton activation quantization + Triton int8 GEMM with the scales in the epilogue;
* ``triton_w8a16`` - Triton weight-only kernel (small M: reads half the bytes of a bf16 weight);
* ``int_mm``       - per-row activation quantization + ``torch._int_mm`` (cuBLAS INT8) + scaling in torch;
* ``reference``    - dequantize + ``F.linear`` (CPU, unsupported GPUs, anything the others refuse).

:mod:`.ops` wraps each as a ``torch.library`` custom op; :mod:`.dispatch` picks one per call.
"""

from __future__ import annotations

import torch

from .int8 import quantize_activation
from .reference import reference_linear
from .support import HAS_TRITON, KernelUnsupported, interpreting

KERNELS = ("triton_w8a8", "triton_w8a16", "int_mm", "reference")


def check_args(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias, block_size: int) -> None:
    """Clear errors for inputs no kernel can use (say what was passed and what to do)."""
    if weight.dtype != torch.int8 or weight.ndim != 2:
        raise ValueError(f"int8_linear: weight must be int8 [out, in], got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"int8_linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the int8 weight "
            f"{tuple(weight.shape)} expects {weight.shape[1]}"
        )
    if not x.is_floating_point():
        raise ValueError(f"int8_linear: input must be floating point, got {x.dtype}")
    check_layer_device("int8_linear", x.device, weight, weight_scale, bias)
    if block_size < 1:
        raise ValueError(f"int8_linear: block_size must be >= 1, got {block_size}")


def check_layer_device(what: str, device: torch.device, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias) -> None:
    """ValueError unless the layer's weight, scale and bias are on the activation's ``device``: a kernel handed a
    tensor from elsewhere (a bias left on ``meta`` by an offloading hook, say) reads a wrong address and brings the
    whole CUDA context down."""
    if (weight.device != device or weight_scale.device != device
            or (bias is not None and bias.device != device)):
        raise ValueError(
            f"{what}: input on {device} but weight on {weight.device}, scale on {weight_scale.device}"
            + ("" if bias is None else f" and bias on {bias.device}") + "; move the layer to the input's device")


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unflatten(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


class _Lazy:
    """Triton modules imported on first use (not at package import: CPU-only installs, import time),
    then kept as plain attributes: an ``import`` statement inside the hot path costs ~1 us per call."""

    quantize_rows = w8a8_matmul = w8a16_matmul = None

    @classmethod
    def load(cls) -> type:
        from .triton_quant import quantize_rows
        from .triton_w8a8 import w8a8_matmul
        from .triton_w8a16 import w8a16_matmul

        cls.quantize_rows, cls.w8a8_matmul, cls.w8a16_matmul = quantize_rows, w8a8_matmul, w8a16_matmul
        return cls


def _triton() -> type:
    return _Lazy if _Lazy.w8a8_matmul is not None else _Lazy.load()


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row INT8 of a 2-D activation: the Triton kernel where it runs, torch elsewhere (same numbers)."""
    if HAS_TRITON and (x2.is_cuda or interpreting()):
        return _triton().quantize_rows(x2)
    return quantize_activation(x2)


def triton_w8a8(x, weight, weight_scale, bias, block_size):
    qa, a_scale = quantize_rows(_rows(x))
    return _unflatten(triton_w8a8_int8(qa, a_scale, weight, weight_scale, bias, x.dtype, block_size), x)


def triton_w8a16(x, weight, weight_scale, bias, block_size):
    return _unflatten(_triton().w8a16_matmul(_rows(x), weight, weight_scale, bias, block_size), x)


def int_mm(x, weight, weight_scale, bias, block_size):
    qa, a_scale = quantize_rows(_rows(x))
    return _unflatten(int_mm_int8(qa, a_scale, weight, weight_scale, bias, x.dtype, block_size), x)


def reference(x, weight, weight_scale, bias, block_size):
    return reference_linear(x, weight, weight_scale, bias, block_size)


def int_mm_supports(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """cuBLAS/CPU ``_int_mm`` limits: M > 16, K >= 16 and K, N multiples of 8; no block scales."""
    m = x.numel() // max(x.shape[-1], 1)
    n, k = weight.shape
    block = weight_scale.ndim == 2 and weight_scale.shape[1] > 1
    return not block and m > 16 and k >= 16 and k % 8 == 0 and n % 8 == 0


# The same products from an activation that is already INT8 (``qa int8 [M, K]``, per-row ``a_scale float32 [M]``):
# ``fn(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size) -> [M, N] out_dtype``. The W8A8 backends
# above are "quantize_rows, then this"; :mod:`.producers` calls these after a fused op wrote ``qa``.

def triton_w8a8_int8(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size):
    return _triton().w8a8_matmul(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size)


def int_mm_int8(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size):
    if weight_scale.ndim == 2 and weight_scale.shape[1] > 1:
        raise KernelUnsupported("int_mm cannot apply block weight scales; use triton_w8a8 or reference")
    acc = torch._int_mm(qa, weight.t())
    w_scale = weight_scale.reshape(-1).float()
    y = acc.float().mul_(a_scale[:, None]).mul_(w_scale if w_scale.numel() > 1 else w_scale.reshape(()))
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype)


def reference_int8(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size):
    """Dequantize both sides and multiply in float32 (CPU, and any call the kernels refuse)."""
    x = qa.float() * a_scale[:, None]
    return reference_linear(x, weight, weight_scale, bias, block_size).to(out_dtype)


BACKENDS_INT8_INPUT = {
    "triton_w8a8": triton_w8a8_int8,
    "int_mm": int_mm_int8,
    "reference": reference_int8,
}


BACKENDS = {
    "triton_w8a8": triton_w8a8,
    "triton_w8a16": triton_w8a16,
    "int_mm": int_mm,
    "reference": reference,
}
