"""``headroom``: ours. ``<p>weight`` int8 ``[out, in]`` + ``<p>weight_scale`` float32 (``[]`` tensorwise, ``[out]``
rowwise, ``[out, nblocks]`` block); the header metadata (``headroom.*`` keys, :mod:`.metadata`) names the method,
block size, quantized and skipped layers, the source file's hash and the tool version.

A rotated layer also carries ComfyUI's convrot ``comfy_quant`` entry (:mod:`.comfy`): one marker every reader
knows, so such a layer reads back through the ``comfy`` format.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from ...kernels.int8 import DEFAULT_BLOCK_SIZE, METHODS
from ...kernels.rotation import ROTATION_GROUPS
from .comfy import COMFY_QUANT_SUFFIX, encode_comfy_quant, int8_config
from .metadata import META_PREFIX, is_headroom_metadata
from .registry import Int8Format


class HeadroomFormat(Int8Format):
    name = "headroom"
    priority = 10  # the whole file's header says so: after any per-layer marker
    summary = "ours: rowwise, block or tensorwise scales"
    writable = True
    methods = METHODS
    rotation_groups = ROTATION_GROUPS

    def owns_layer(self, keys: Container[str], prefix: str, file_metadata: Mapping[str, str] | None) -> bool:
        return is_headroom_metadata(file_metadata)

    def owns_header_key(self, key: str) -> bool:
        return key.startswith(META_PREFIX)

    def output_tag(self, method: str) -> str:
        return method  # model-int8-rowwise.safetensors: ours is the default layout, the method tells files apart

    def layer_tensors(self, prefix, weight, scale, method, block_size=DEFAULT_BLOCK_SIZE, rotation_group=0):
        tensors = super().layer_tensors(prefix, weight, scale, method, block_size, rotation_group)
        if rotation_group:
            tensors[prefix + COMFY_QUANT_SUFFIX] = encode_comfy_quant(int8_config(rotation_group, comfy=False))
        return tensors
