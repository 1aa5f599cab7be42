"""Replace the ``nn.Linear`` layers of any module tree by :class:`Int8Linear`, honouring skips."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from ..kernels.int8 import DEFAULT_BLOCK_SIZE, METHODS
from .linear import Int8Linear
from .report import DtypeReport, dtype_report, log_report, nonfinite
from .skip import DEFAULT_MIN_FEATURES, decide, resolve_patterns


class QuantizeError(ValueError):
    """:func:`quantize_model` refused (an option out of range, NaN/inf weights); the model was not touched."""


def _check_options(module, method, block_size, min_features, compute_dtype) -> None:
    if not isinstance(module, nn.Module):
        raise QuantizeError(f"quantize_model needs a torch.nn.Module, got {type(module).__name__}")
    if method not in METHODS:
        raise QuantizeError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    for name, value, low in (("block_size", block_size, 1), ("min_features", min_features, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise QuantizeError(f"{name}={value!r}: expected a whole number >= {low}")
    if compute_dtype is not None and (not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point):
        raise QuantizeError(f"compute_dtype={compute_dtype!r}: expected None (the bias's dtype) or a float torch.dtype "
                            "such as torch.bfloat16")


def quantize_model(
    module: nn.Module,
    method: str = "rowwise",
    skip: Sequence[str] | str | None = None,
    keep_default_skips: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_features: int = DEFAULT_MIN_FEATURES,
    compute_dtype: torch.dtype | None = None,
) -> DtypeReport:
    """Quantize ``module`` in place, one layer at a time (the float weight is freed as we go).

    Returns the :class:`DtypeReport` (also logged): what was quantized, what was kept and why. Everything is
    checked before the first layer is replaced - the options, and every layer to quantize for NaN/inf in its
    weight or bias (quantizing those zeroes rows or spreads NaN) - so a :class:`QuantizeError` leaves the model
    as it was.
    """
    _check_options(module, method, block_size, min_features, compute_dtype)
    patterns = resolve_patterns(skip, keep_default_skips)
    skipped: dict[str, str] = {}
    chosen: list[tuple[str, nn.Linear]] = []
    damaged: list[str] = []
    for name, linear in module.named_modules():
        if not isinstance(linear, nn.Linear) or isinstance(linear, Int8Linear):
            continue
        decision = decide(name, linear.in_features, linear.out_features, patterns, method, block_size, min_features)
        if decision.skip:
            skipped[name] = decision.reason
            continue
        chosen.append((name, linear))
        for part in ("weight", "bias"):
            tensor = getattr(linear, part)
            problem = nonfinite(tensor) if tensor is not None else None
            if problem:
                damaged.append(f"{name}.{part} has {problem}")
    if damaged:
        raise QuantizeError(f"{len(damaged)} layer tensor(s) hold NaN/inf values: {'; '.join(damaged[:4])}"
                            f"{' ...' if len(damaged) > 4 else ''}. The weights are damaged (re-download or re-export "
                            "the checkpoint); nothing was quantized, the model is unchanged")
    for name, linear in chosen:
        _set_submodule(module, name, Int8Linear.from_linear(linear, method, block_size, compute_dtype))
    report = dtype_report(module, patterns, skipped)
    log_report(report)
    return report


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
