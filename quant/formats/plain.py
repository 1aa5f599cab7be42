"""``plain``: no description at all, read only - an int8 weight next to ``<p>weight_scale`` or ``<p>scale_weight``
(scalar, ``[out]`` or ``[out, 1]``): lightx2v int8-vllm, OneTrainer / convert_to_quant exports.

The fallback: it claims every INT8 layer no other format claims, so it is asked last.
"""

from __future__ import annotations

from .registry import Int8Format


class PlainFormat(Int8Format):
    name = "plain"
    label = "plain_int8"
    priority = -100  # the fallback
    summary = "lightx2v / OneTrainer: an int8 weight and its scale, nothing else"

    def owns_layer(self, keys, prefix, file_metadata=None) -> bool:
        return True
