"""``headroom``: ours. ``<p>weight`` int8 ``[out, in]`` + ``<p>weight_scale`` float32 (``[]`` tensorwise, ``[out]``
rowwise, ``[out, nblocks]`` block); the header metadata (``headroom.*`` keys, :mod:`.metadata`) names the method,
block size, quantized and skipped layers, the source file's hash and the tool version.

A rotated layer also carries ComfyUI's convrot ``comfy_quant`` entry (:mod:`.comfy`), the one marker of a rotation
every reader knows. In a file whose header names this layout, this format reads every layer, rotated ones included
(their group from that entry): the file says what it is, so ``headroom inspect`` and the loaders call it ours.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from ...kernels.int8 import DEFAULT_BLOCK_SIZE, METHODS
from ...kernels.rotation import ROTATION_GROUPS
from .builtin import HEADROOM, SUMMARIES
from .comfy import COMFY_QUANT_SUFFIX, ComfyConfigFormat, decode_comfy_quant, encode_comfy_quant, int8_config
from .metadata import META_LAYOUT, META_PREFIX, check_format_version, is_headroom_metadata


class HeadroomFormat(ComfyConfigFormat):
    name = HEADROOM
    priority = 40  # the file's own header names this layout: it says what every layer is, markers included
    summary = SUMMARIES[HEADROOM]
    marker_suffixes = (COMFY_QUANT_SUFFIX,)  # a rotated layer's convrot entry
    writable = True
    methods = METHODS
    rotation_groups = ROTATION_GROUPS

    def owns_layer(self, keys: Container[str], prefix: str, file_metadata: Mapping[str, str] | None) -> bool:
        return is_headroom_metadata(file_metadata) and file_metadata.get(META_LAYOUT, self.name) == self.name

    def owns_header_key(self, key: str) -> bool:
        return key.startswith(META_PREFIX)

    def layer_config(self, tensors, prefix, file_metadata=None) -> dict:
        """A rotated layer's convrot entry; nothing for a plain one."""
        key = prefix + COMFY_QUANT_SUFFIX
        return decode_comfy_quant(tensors[key], key) if key in tensors else {}

    def read(self, tensors, prefix, file_metadata=None):
        check_format_version(file_metadata)
        return super().read(tensors, prefix, file_metadata)

    def output_tag(self, method: str) -> str:
        return method  # model-int8-rowwise.safetensors: ours is the default layout, the method tells files apart

    def layer_tensors(self, prefix, weight, scale, method, block_size=DEFAULT_BLOCK_SIZE, rotation_group=0):
        tensors = super().layer_tensors(prefix, weight, scale, method, block_size, rotation_group)
        if rotation_group:
            tensors[prefix + COMFY_QUANT_SUFFIX] = encode_comfy_quant(int8_config(rotation_group, comfy=False))
        return tensors
