"""Block Hadamard rotation math on tensors (QuaRot-style), in ComfyUI's "convrot" convention.

Why: a few input channels with huge magnitude (outliers) force a large per-row scale, so row-wise INT8
rounds every other weight of that row coarsely. Multiplying each group of ``g`` input channels by an
orthonormal Hadamard matrix ``H`` spreads an outlier over the whole group; because ``H`` is orthonormal
and symmetric (``H @ H = I``), rotating both sides leaves the product unchanged::

    y = x W^T = (x H)(W H)^T        (per group of g input channels)

so a rotated layer stores ``Q(W H)`` and rotates its input on the fly before quantizing it. A rotated
weight must never be used as if it were plain: :func:`unrotate_weight` brings it back.

The matrix is ComfyUI / comfy-kitchen's "regular" Hadamard: Kronecker powers of the symmetric 4x4
``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]``, normalised by ``1/sqrt(g)``, no random signs. Group
sizes that are powers of 4 (16, 64, 256) therefore match files comfy-kitchen writes bit for bit. Our own
format also accepts ``2 * 4**a`` (32, 128) through ``[[1,1],[1,-1]] (x) H_{4**a}`` (still symmetric and
orthonormal); ComfyUI cannot read those, so the ComfyUI layout refuses them.

How a rotated layer is written and recognised on disk is the formats' business
(:mod:`comfyui_headroom.quant.rotation`, :mod:`comfyui_headroom.quant.formats`); this module is the math.
"""

from __future__ import annotations

import functools
import math

import torch

from .constants import COMFY_ROTATION_GROUPS, DEFAULT_ROTATION_GROUP, ROTATION_GROUPS  # noqa: F401 (re-exported)
from .int8 import DEFAULT_BLOCK_SIZE, dequantize_weight, quantize_activation, quantize_weight


def check_group(group: int, comfy: bool = False) -> int:
    """Validate a rotation group size (``comfy=True``: only the sizes ComfyUI itself can read)."""
    allowed = COMFY_ROTATION_GROUPS if comfy else ROTATION_GROUPS
    if group not in allowed:
        where = "ComfyUI's convrot layout" if comfy else "rotation"
        raise ValueError(f"{where} supports group sizes {', '.join(map(str, allowed))}; got {group}")
    return group


def rotation_fits(in_features: int, group: int) -> bool:
    """A layer can be rotated when its input width is a whole number of groups."""
    return group > 0 and in_features % group == 0


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(group: int) -> torch.Tensor:
    check_group(group)
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    power = (group.bit_length() - 1) // 2  # group = 4**power or 2 * 4**power
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(power):
        h = torch.kron(h, h4)
    if h.shape[0] != group:  # group = 2 * 4**a
        h = torch.kron(torch.tensor([[1, 1], [1, -1]], dtype=torch.float64), h)
    return (h / math.sqrt(group)).float()


_device_cache: dict = {}


def hadamard(group: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised symmetric ``[group, group]`` Hadamard matrix (cached per device and dtype)."""
    key = (group, str(device), dtype)
    h = _device_cache.get(key)
    if h is None:
        h = _hadamard_cpu(group).to(device=device, dtype=dtype)
        _device_cache[key] = h
    return h


def _rotate_last_dim(t: torch.Tensor, group: int) -> torch.Tensor:
    """``t`` with every ``group`` consecutive entries of its last dim multiplied by ``H`` (float32 math)."""
    k = t.shape[-1]
    if not rotation_fits(k, group):
        raise ValueError(f"width {k} is not a multiple of the rotation group {group}")
    h = hadamard(group, t.device)
    grouped = t.float().reshape(*t.shape[:-1], k // group, group)
    return torch.matmul(grouped, h).reshape(t.shape)


def rotate_weight(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``[out, in]`` -> ``W H`` per input group, float32 (what gets quantized)."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    return _rotate_last_dim(weight, group)


def unrotate_weight(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`rotate_weight` (``H`` is its own inverse), float32."""
    return rotate_weight(weight, group)


def dequantize_unrotated(qweight: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype = torch.float32,
                         block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """int8 + scale -> the float weight in the plain basis: un-rotated (in float32) when ``group`` > 0."""
    if not group:
        return dequantize_weight(qweight, scale, dtype, block_size)
    return unrotate_weight(dequantize_weight(qweight, scale, torch.float32, block_size), group).to(dtype)


def rotate_activation(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[..., K]`` -> ``x H`` per group, in ``x``'s dtype.

    CPU: computed in float32. CUDA half/bf16 with a power-of-4 group: one batched tensor-core GEMM in
    ``x``'s dtype (``H``'s entries ``+-2**-a`` are exact there; float32 accumulation, one rounding of the
    result), no float32 copy of the activation. The fused kernel (kernels/hadamard.py) also skips this pass.
    """
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and group in COMFY_ROTATION_GROUPS:
        k = x.shape[-1]
        if not rotation_fits(k, group):
            raise ValueError(f"width {k} is not a multiple of the rotation group {group}")
        h = hadamard(group, x.device, x.dtype)
        return torch.matmul(x.reshape(*x.shape[:-1], k // group, group), h).reshape(x.shape)
    return _rotate_last_dim(x, group).to(x.dtype)


def rotate_quantize_activation_reference(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate then dynamic per-token INT8: the function the fused kernel in kernels/hadamard.py computes."""
    return quantize_activation(_rotate_last_dim(x, group))


def quantize_rotated(
    weight: torch.Tensor, group: int, method: str = "rowwise", block_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a float ``[out, in]`` weight and quantize it: ``(int8 Q(W H), float32 scale)``."""
    return quantize_weight(rotate_weight(weight, group), method, block_size)
