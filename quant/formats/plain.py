"""``plain``: no description at all, read only - an int8 weight next to ``<p>weight_scale`` or ``<p>scale_weight``
(scalar, ``[out]`` or ``[out, 1]``): lightx2v int8-vllm, OneTrainer / convert_to_quant exports.

The fallback: it claims every INT8 layer no other format claims, so it is asked last.
"""

from __future__ import annotations

from .builtin import PLAIN, SUMMARIES
from .registry import Int8Format


class PlainFormat(Int8Format):
    name = PLAIN
    label = "plain_int8"
    priority = -100  # the fallback
    summary = SUMMARIES[PLAIN]

    def owns_layer(self, keys, prefix, file_metadata=None) -> bool:
        return True
