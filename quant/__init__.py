"""Quantized weights: INT8 math, the INT8 linear layer, skip rules, the dtype report, formats on disk.

The names below load on first use (PEP 562): importing a torch-free module of this package (the formats' names in
:mod:`.formats.builtin`, which the command line shows) does not import torch.
"""

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


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..kernels.int8 import METHODS, dequantize_weight, quantize_activation, quantize_weight, relative_error
    from .linear import Int8Linear
    from .replace import quantize_model
    from .report import DtypeReport, dtype_report
    from .skip import ATTENTION_SKIP_PATTERNS, DEFAULT_SKIP_PATTERNS, resolve_patterns

    globals().update(METHODS=METHODS, ATTENTION_SKIP_PATTERNS=ATTENTION_SKIP_PATTERNS,
                     DEFAULT_SKIP_PATTERNS=DEFAULT_SKIP_PATTERNS, DtypeReport=DtypeReport, Int8Linear=Int8Linear,
                     dequantize_weight=dequantize_weight, dtype_report=dtype_report,
                     quantize_activation=quantize_activation, quantize_model=quantize_model,
                     quantize_weight=quantize_weight, relative_error=relative_error, resolve_patterns=resolve_patterns)
    return globals()[name]
