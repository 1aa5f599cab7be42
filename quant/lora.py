"""LoRA on INT8 layers: float side branches instead of re-quantized weights.

ComfyUI keeps a LoRA as *patches* on its model patcher: per weight key a list of
``(strength, adapter, strength_model, offset, function)``. For a float layer ComfyUI merges them into the
weight. For an INT8 layer merging would mean dequantize -> add -> re-quantize on every strength change,
and re-quantization error piles up. Instead each LoRA patch becomes a side branch
``y += scale * (x @ down.T) @ up.T`` (``scale = strength * alpha / rank``) next to the untouched int8
matmul (seed 004). Changing the strength only changes ``scale``.

Only what is exactly expressible as such a branch is accepted: LoRA / LoCon-for-linear without DoRA,
without a reshape, with ``strength_model == 1`` and no weight function. Everything else (LoHa, LoKr,
DoRA, full-weight "diff"/"set" patches, merged-model patches) raises :class:`UnsupportedPatchError`
naming the layer - never a silently wrong model.

This module has no ComfyUI import: patches are duck-typed (an adapter has ``.name`` and ``.weights``).
It also prepares LoRA *files* whose tensors are themselves INT8 (dequantized once), checks shapes
before anything is attached, and keeps a bounded cache of prepared (padded, cast) tensors.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Branch = tuple  # (down [r, in], up [out, r], scale: float)


class UnsupportedPatchError(ValueError):
    """A patch on an INT8 layer that cannot be applied as a float side branch."""


class LoraShapeError(ValueError):
    """A LoRA whose tensors do not fit the model's layers (the message lists them)."""


# ---------------------------------------------------------------------------------------------------
# Reading one ComfyUI patch
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LowRank:
    """One LoRA patch reduced to its factors: ``delta = scale * up @ down`` placed at ``offset``."""

    down: torch.Tensor  # [r, in_slice]
    up: torch.Tensor  # [out_slice, r]
    scale: float
    offset: tuple | None  # ComfyUI's (dim, start, length) or None
    sources: tuple = ()  # the adapter's own (down, up) tensor objects: the cache's identity key


def _patch_kind(value) -> str:
    if isinstance(value, list):
        return "merged weights (a list patch, e.g. from a model merge node)"
    name = getattr(value, "name", None)
    if name is not None:
        return str(name)
    if isinstance(value, tuple):
        return "diff" if len(value) == 1 else str(value[0])
    return type(value).__name__


def low_rank_of(patch: Sequence, key: str) -> LowRank:
    """``(strength, adapter, strength_model, offset, function)`` -> :class:`LowRank`, or UnsupportedPatchError."""
    strength, value, strength_model, offset, function = (list(patch) + [None] * 5)[:5]
    kind = _patch_kind(value)
    if kind != "lora" or not hasattr(value, "weights"):
        raise UnsupportedPatchError(f"{key}: a '{kind}' patch cannot be applied to an INT8 layer as a side branch")
    if function is not None:
        raise UnsupportedPatchError(f"{key}: a LoRA with a weight function cannot be applied to an INT8 layer")
    if strength_model not in (None, 1, 1.0):
        raise UnsupportedPatchError(f"{key}: strength_model={strength_model} would rescale the INT8 base weight")
    up, down, alpha, mid, dora_scale, reshape = (tuple(value.weights) + (None,) * 6)[:6]
    sources = (down, up)
    if dora_scale is not None:
        raise UnsupportedPatchError(f"{key}: DoRA (dora_scale) needs the merged weight's norm; not possible on INT8")
    if mid is not None or reshape is not None:
        raise UnsupportedPatchError(f"{key}: a LoRA with a mid (Tucker/conv) factor or a reshape is not a linear side branch")
    up = up.reshape(up.shape[0], -1)
    down = down.reshape(down.shape[0], -1)
    if up.shape[1] != down.shape[0]:
        raise UnsupportedPatchError(f"{key}: LoRA up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
    rank = down.shape[0]
    if rank == 0:
        raise LoraShapeError(f"{key}: the LoRA has rank 0 (empty up/down factors); the file is damaged")
    alpha_scale = _alpha(alpha, key) / rank if alpha is not None else 1.0
    return LowRank(down, up, float(strength) * alpha_scale, tuple(offset) if offset is not None else None, sources)


def _alpha(alpha, key: str) -> float:
    """A LoRA's alpha as a finite number; LoraShapeError naming the layer for a tensor of several values, NaN or
    inf (a NaN alpha made every output of the layer NaN)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise LoraShapeError(f"{key}: the LoRA's alpha has shape {tuple(alpha.shape)}; expected one number - "
                                 "the file is damaged")
        alpha = alpha.item()
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise LoraShapeError(f"{key}: the LoRA's alpha {alpha!r} is not a number; the file is damaged") from None
    if not math.isfinite(value):
        raise LoraShapeError(f"{key}: the LoRA's alpha is {value}; the file is damaged")
    return value


def target_shape(low: LowRank) -> tuple[int, int]:
    """(rows, cols) of the weight slice the patch adds to."""
    return low.up.shape[0], low.down.shape[1]


def fits(low: LowRank, out_features: int, in_features: int) -> str | None:
    """None when the patch fits a ``[out, in]`` weight, else why not."""
    rows, cols = target_shape(low)
    if low.offset is None:
        if (rows, cols) != (out_features, in_features):
            return f"LoRA delta {rows}x{cols} vs layer {out_features}x{in_features}"
        return None
    dim, start, length = low.offset
    full = (out_features, in_features)
    if dim not in (0, 1) or start < 0 or start + length > full[dim]:
        return f"offset {low.offset} outside layer {out_features}x{in_features}"
    want = (length, in_features) if dim == 0 else (out_features, length)
    if (rows, cols) != want:
        return f"LoRA delta {rows}x{cols} vs slice {want[0]}x{want[1]} at offset {low.offset}"
    return None


# ---------------------------------------------------------------------------------------------------
# Prepared tensors: padded to the full layer, cast, cached (bounded)
# ---------------------------------------------------------------------------------------------------

def _cache_limit_bytes() -> int:
    """``HEADROOM_LORA_CACHE_MB`` (default 2048) in bytes; ValueError naming the variable for anything but a
    number of MB from 0 up."""
    text = os.environ.get("HEADROOM_LORA_CACHE_MB", "2048")
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb >= 0):
        raise ValueError(f"HEADROOM_LORA_CACHE_MB={text!r}: give the LoRA cache size in MB, a number from 0 up "
                         "(default 2048)")
    return int(mb * 2**20)


class PreparedCache:
    """LRU of prepared ``(down, up)`` pairs on the CPU, keyed by the source tensors (held weakly)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def limit(self) -> int:
        return self.max_bytes if self.max_bytes is not None else _cache_limit_bytes()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def get_or_prepare(self, low: LowRank, out_features: int, in_features: int, dtype: torch.dtype):
        src_down, src_up = low.sources or (low.down, low.up)
        key = (id(src_down), id(src_up), low.offset, out_features, in_features, dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is src_down and entry[1]() is src_up:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[2], entry[3]
        down, up = _pad(low, out_features, in_features, dtype)
        size = down.numel() * down.element_size() + up.numel() * up.element_size()
        with self._lock:
            self.misses += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[4]
            if size <= self.limit:
                self._entries[key] = (weakref.ref(src_down), weakref.ref(src_up), down, up, size)
                self._bytes += size
                while self._bytes > self.limit and self._entries:
                    *_, evicted = self._entries.popitem(last=False)[1]
                    self._bytes -= evicted
        return down, up


def _pad(low: LowRank, out_features: int, in_features: int, dtype: torch.dtype):
    down = low.down.detach().to("cpu", dtype)
    up = low.up.detach().to("cpu", dtype)
    if low.offset is not None:
        dim, start, length = low.offset
        if dim == 0 and length != out_features:
            full = torch.zeros(out_features, up.shape[1], dtype=dtype)
            full[start:start + length] = up
            up = full
        elif dim == 1 and length != in_features:
            full = torch.zeros(down.shape[0], in_features, dtype=dtype)
            full[:, start:start + length] = down
            down = full
    return down.contiguous(), up.contiguous()


PREPARED = PreparedCache()


def side_branches(
    patches: Sequence,
    key: str,
    out_features: int,
    in_features: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    cache: PreparedCache | None = None,
) -> list[Branch]:
    """Every patch on ``key`` as a ``(down, up, scale)`` branch on ``device`` (CPU copies when None)."""
    cache = cache if cache is not None else PREPARED
    branches = []
    for patch in patches:
        low = low_rank_of(patch, key)
        problem = fits(low, out_features, in_features)
        if problem:
            raise LoraShapeError(f"{key}: {problem}")
        if low.scale == 0.0:
            continue
        down, up = cache.get_or_prepare(low, out_features, in_features, dtype)
        if device is not None and torch.device(device).type != "cpu":
            down = down.to(device, non_blocking=True)
            up = up.to(device, non_blocking=True)
        branches.append((down, up, low.scale))
    return branches


def apply_side_branches(x: torch.Tensor, y: torch.Tensor, branches: Sequence[Branch]) -> torch.Tensor:
    """``y + sum(scale * (x down^T) up^T)`` in ``x``'s dtype; branch tensors move to ``x``'s device per call."""
    for down, up, scale in branches:
        d = down.to(device=x.device, dtype=x.dtype, non_blocking=True)
        u = up.to(device=x.device, dtype=x.dtype, non_blocking=True)
        y = y + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, d), u)
    return y


# ---------------------------------------------------------------------------------------------------
# LoRA files: INT8 tensors, shape checks
# ---------------------------------------------------------------------------------------------------

def dequantize_int8_lora(tensors: Mapping[str, torch.Tensor], file_metadata: dict | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], int]:
    """A LoRA state dict with every INT8 factor dequantized (and un-rotated): ``(float dict, count)``.

    INT8 LoRA factors use the same layouts as INT8 checkpoints (``<name>.weight`` int8 +
    ``<name>.weight_scale`` / ``comfy_quant``), read by :func:`.formats.parse_int8_layer`.
    """
    from .formats import parse_int8_layer

    out = dict(tensors)
    count = 0
    for key in list(tensors):
        if not key.endswith(".weight") or tensors[key].dtype != torch.int8:
            continue
        prefix = key[: -len("weight")]
        layer = parse_int8_layer(tensors, prefix, file_metadata)
        if layer is None:
            continue
        for consumed in layer.consumed_keys:
            out.pop(consumed, None)
        out[key] = layer.dequantized(dtype)
        count += 1
    return out, count


def patch_shape_problems(patches: Mapping, weight_shapes: Mapping[str, tuple]) -> list[str]:
    """Patches (``{key or (key, offset[, fn]): adapter}``, as ``comfy.lora.load_lora`` returns) that do not
    fit the model's weights (``{key: shape}``). One line per layer; empty when everything fits."""
    problems = []
    for k, value in patches.items():
        key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
        shape = weight_shapes.get(key)
        if shape is None or len(shape) != 2:
            continue  # not a linear weight: ComfyUI's own merge logic checks those
        if getattr(value, "name", None) == "lora" and hasattr(value, "weights"):
            try:
                low = low_rank_of((1.0, value, 1.0, offset, None), key)
            except UnsupportedPatchError:
                continue  # reported when attached to an INT8 layer; float layers merge it normally
            problem = fits(low, shape[0], shape[1])
        elif isinstance(value, tuple) and len(value) == 2 and value[0] == "diff":
            diff = value[1][0]
            problem = None if offset is not None or tuple(diff.shape) == tuple(shape) else \
                f"diff {tuple(diff.shape)} vs layer {tuple(shape)}"
        else:
            problem = None
        if problem:
            problems.append(f"{key}: {problem}")
    return problems
