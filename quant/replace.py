"""Replace the ``nn.Linear`` layers of any module tree by :class:`Int8Linear`, honouring skips."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..kernels.int8 import DEFAULT_BLOCK_SIZE
from .linear import Int8Linear
from .report import DtypeReport, dtype_report, log_report
from .skip import DEFAULT_MIN_FEATURES, decide, resolve_patterns


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

    Returns the :class:`DtypeReport` (also logged): what was quantized, what was kept and why.
    """
    patterns = resolve_patterns(skip, keep_default_skips)
    skipped: dict[str, str] = {}
    targets = [(name, sub) for name, sub in module.named_modules()
               if isinstance(sub, nn.Linear) and not isinstance(sub, Int8Linear)]
    for name, linear in targets:
        decision = decide(name, linear.in_features, linear.out_features, patterns, method, block_size, min_features)
        if decision.skip:
            skipped[name] = decision.reason
            continue
        replacement = Int8Linear.from_linear(linear, method, block_size, compute_dtype)
        _set_submodule(module, name, replacement)
    report = dtype_report(module, patterns, skipped)
    log_report(report)
    return report


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
