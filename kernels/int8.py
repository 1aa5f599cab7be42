"""Symmetric INT8 quantization of weights and activations.

One weight layout everywhere: ``int8 [out, in]`` as in ``nn.Linear`` plus float32 scales whose shape
tells the granularity:

* ``rowwise``    -> scale ``[out]``                      (one per output channel; default)
* ``block``      -> scale ``[out, ceil(in / block)]``    (one per output channel per ``block`` inputs)
* ``tensorwise`` -> scale ``[]``                         (one scalar)

Values are ``q = round(w / scale)`` clamped to [-127, 127] (symmetric: -128 is never used, so negation
is exact). An all-zero row or block gets scale 1.0 instead of 0, so dequantization never sees 0/0.
"""

from __future__ import annotations

import math

import torch

from .constants import DEFAULT_BLOCK_SIZE, METHODS  # noqa: F401 (re-exported: the math and its names together)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # float weights stored in 8 bits (scaled or not)
QMAX = 127.0


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127, with 1.0 where amax is 0 (a zero row must not produce NaN/inf).

    The divisor is a tensor on amax's device: CUDA turns a division by a Python scalar into a multiplication
    by its reciprocal, which rounds differently from the CPU and would make GPU conversions differ by an ulp.
    """
    amax = amax.float()
    scale = amax / torch.full((), QMAX, device=amax.device)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_weight(
    weight: torch.Tensor, method: str = "rowwise", block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a ``[out, in]`` float weight. Returns ``(int8 [out, in], float32 scale)``."""
    if method not in METHODS:
        raise ValueError(f"unknown INT8 method {method!r}; choose one of {', '.join(METHODS)}")
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight is already {weight.dtype}; quantize a floating-point tensor")
    w = weight.float()
    if method == "tensorwise":
        scale = scale_from_amax(w.abs().amax())
        q = torch.round(w / scale)
    elif method == "rowwise":
        scale = scale_from_amax(w.abs().amax(dim=1))
        q = torch.round(w / scale[:, None])
    else:
        out_features, in_features = w.shape
        blocks = math.ceil(in_features / block_size)
        padded = torch.nn.functional.pad(w, (0, blocks * block_size - in_features))
        grouped = padded.view(out_features, blocks, block_size)
        scale = scale_from_amax(grouped.abs().amax(dim=2))
        q = torch.round(grouped / scale[:, :, None]).view(out_features, -1)[:, :in_features]
    return q.clamp_(-QMAX, QMAX).to(torch.int8).contiguous(), scale.contiguous()


def method_of_scale(scale: torch.Tensor, out_features: int | None = None) -> str:
    """Infer the granularity from a scale tensor's shape (``[]``/``[1]`` tensorwise, ``[out]``/``[out,1]`` rowwise)."""
    if scale.numel() == 1 and (out_features is None or out_features != 1 or scale.ndim == 0):
        return "tensorwise"
    if scale.ndim == 1 or (scale.ndim == 2 and scale.shape[1] == 1):
        return "rowwise"
    if scale.ndim == 2:
        return "block"
    raise ValueError(f"cannot interpret an INT8 scale of shape {tuple(scale.shape)}")


def scale_shape(method: str, out_features: int, in_features: int, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, ...]:
    """The shape of our float32 scale for ``method``: ``()``, ``(out,)`` or ``(out, ceil(in / block_size))``."""
    if method == "tensorwise":
        return ()
    if method == "rowwise":
        return (out_features,)
    if method == "block":
        return (out_features, math.ceil(in_features / block_size))
    raise ValueError(f"unknown INT8 method {method!r}; choose one of {', '.join(METHODS)}")


def normalise_scale(scale: torch.Tensor, weight_shape: tuple[int, int], name: str = "weight_scale") -> torch.Tensor:
    """Any stored INT8 scale -> float32 ``[]``, ``[out]`` or ``[out, nblocks]``; ValueError naming ``name`` when it
    cannot fit the ``[out, in]`` weight. Files store a row scale as ``[out]`` or ``[out, 1]`` (ComfyUI) and one value
    as ``[]``, ``[1]`` or ``[1, 1]``; everything that reads a scale goes through here."""
    out_features, in_features = weight_shape
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        # One value: tensorwise - except a [1] / [1, 1] scale of a one-row weight, which is its row scale.
        return scale.reshape(()) if out_features != 1 or scale.ndim == 0 else scale.reshape(1)
    if scale.ndim == 1 and scale.shape[0] == out_features:
        return scale
    if scale.ndim == 2 and scale.shape[0] == out_features:
        if scale.shape[1] == 1:
            return scale.reshape(out_features)
        block_size_of(in_features, scale)  # raises when the block count does not fit in_features
        return scale
    raise ValueError(f"INT8 scale '{name}' has shape {tuple(scale.shape)}, which does not fit the weight "
                     f"[{out_features}, {in_features}] (expected [], [out], [out, 1] or [out, nblocks])")


def block_size_of(in_features: int, scale: torch.Tensor, default: int = DEFAULT_BLOCK_SIZE) -> int:
    """The block size implied by a block scale ``[out, nblocks]`` (the default when it is consistent)."""
    blocks = scale.shape[-1]
    if math.ceil(in_features / default) == blocks:
        return default
    size = math.ceil(in_features / blocks)
    if math.ceil(in_features / size) != blocks:
        raise ValueError(f"block scale with {blocks} blocks does not fit in_features={in_features}")
    return size


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Broadcast any scale layout to a full ``[out, in]`` float32 tensor (reference/dequant helper)."""
    out_features, in_features = shape
    scale = scale.float()
    method = method_of_scale(scale, out_features)
    if method == "tensorwise":
        return scale.reshape(1, 1).expand(out_features, in_features)
    if method == "rowwise":
        return scale.reshape(out_features, 1).expand(out_features, in_features)
    return scale.repeat_interleave(block_size, dim=1)[:, :in_features]


def dequantize_weight(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """int8 ``[out, in]`` + scale -> float ``[out, in]`` in ``dtype`` (computed in float32)."""
    if qweight.ndim != 2:
        raise ValueError(f"expected a 2-D int8 weight, got shape {tuple(qweight.shape)}")
    full = expand_scale(scale.to(qweight.device), tuple(qweight.shape), block_size)
    return (qweight.float() * full).to(dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric INT8: ``[..., K]`` -> ``(int8 [..., K], float32 scale [...])``."""
    xf = x.float()
    scale = scale_from_amax(xf.abs().amax(dim=-1))
    q = torch.round(xf / scale[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (0 for an exact zero tensor)."""
    a, e = approx.double(), exact.double()
    denom = e.norm()
    if denom == 0:
        return float((a - e).norm())
    return float((a - e).norm() / denom)
