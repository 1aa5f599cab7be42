"""Quantized weights: INT8 math, the INT8 linear layer, skip rules, the dtype report, formats on disk."""

from ..kernels.int8 import (
    METHODS,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
    relative_error,
)
from .linear import Int8Linear
from .replace import quantize_model
from .report import DtypeReport, dtype_report
from .skip import ATTENTION_SKIP_PATTERNS, DEFAULT_SKIP_PATTERNS, resolve_patterns

__all__ = [
    "METHODS",
    "ATTENTION_SKIP_PATTERNS",
    "DEFAULT_SKIP_PATTERNS",
    "DtypeReport",
    "Int8Linear",
    "dequantize_weight",
    "dtype_report",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "relative_error",
    "resolve_patterns",
]
