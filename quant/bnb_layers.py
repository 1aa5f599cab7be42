"""bitsandbytes layers, recognised by class name: the one place that knows those names.

bitsandbytes is optional and importing it sets up its GPU backend, so nothing of ours imports it to ask
``isinstance``: a module is a bitsandbytes layer when its class (or, for LLM.int8, its weight's class) has one
of bitsandbytes' names. The dtype report, memory's tensor collection (soft unload, streaming) and the
HunyuanImage-3 road all ask :func:`bnb_layer_kind` or the two predicates below.
"""

from __future__ import annotations

from torch import nn

INT8_LAYER_NAMES = ("Linear8bitLt",)  # LLM.int8; its weight is an ``Int8Params``
INT8_PARAM_NAMES = ("Int8Params",)
FOUR_BIT_LAYER_NAMES = ("Linear4bit", "LinearNF4", "LinearFP4")  # NF4 / FP4; weight ``Params4bit``
FOUR_BIT_PARAM_NAMES = ("Params4bit",)


def bnb_layer_kind(module: nn.Module) -> str | None:
    """``"int8"`` (LLM.int8: ``Linear8bitLt`` or any module holding an ``Int8Params`` weight), ``"4bit"``
    (``Linear4bit`` and its NF4 / FP4 subclasses) or None (not a bitsandbytes layer)."""
    if (type(module).__name__ in INT8_LAYER_NAMES
            or type(getattr(module, "weight", None)).__name__ in INT8_PARAM_NAMES):
        return "int8"
    if type(module).__name__ in FOUR_BIT_LAYER_NAMES:
        return "4bit"
    return None


def is_bnb_quantized(module: nn.Module) -> bool:
    """A bitsandbytes quantized layer (LLM.int8 or 4-bit)."""
    return bnb_layer_kind(module) is not None


def is_bnb_4bit_weight(tensor) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``): packed NF4 / FP4 values, whatever dtype it says."""
    return type(tensor).__name__ in FOUR_BIT_PARAM_NAMES


def is_bnb_int8(module: nn.Module) -> bool:
    """An LLM.int8 layer: its int8 weight and scales also live outside its parameters (``CB``/``SCB`` on the
    weight and on ``module.state``), which whoever moves its tensors has to follow."""
    return bnb_layer_kind(module) == "int8"
