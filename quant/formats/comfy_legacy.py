"""``comfy_legacy``: older ComfyUI files, read only. The header metadata ``_quantization_metadata`` holds JSON
``{"layers": {"<layer>": {"format": "int8_tensorwise"}}}``; each layer has ``<p>weight`` + ``<p>weight_scale``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Container, Mapping
from types import MappingProxyType

from ..safetensors_stream import FormatError
from .builtin import COMFY_LEGACY, SUMMARIES
from .comfy import ComfyConfigFormat

COMFY_LEGACY_KEY = "_quantization_metadata"


def comfy_legacy_layers(file_metadata: Mapping[str, str] | None) -> Mapping[str, dict]:
    """``{layer: config}`` (read-only) from an old ComfyUI header's ``_quantization_metadata`` (empty when absent)."""
    raw = (file_metadata or {}).get(COMFY_LEGACY_KEY)
    return _parse_legacy(raw) if raw else MappingProxyType({})


@functools.lru_cache(maxsize=8)
def _parse_legacy(raw: str) -> Mapping[str, dict]:
    # Cached (hence read-only): a loader asks once per layer, and the JSON names every layer of the model.
    def damaged(problem: str) -> FormatError:
        return FormatError(f"header metadata '{COMFY_LEGACY_KEY}' {problem}: the file's quantization metadata is "
                           f"damaged; re-export the file")

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise damaged("is not valid JSON") from None
    if not isinstance(data, dict):
        raise damaged(f"holds a JSON {type(data).__name__}, not an object")
    layers = data.get("layers", {})
    if not isinstance(layers, dict):
        raise damaged("has a 'layers' entry that is not an object of layer -> config")
    bad = next((name for name, config in layers.items() if not isinstance(config, dict)), None)
    if bad is not None:
        raise damaged(f"gives layer '{bad}' the config {layers[bad]!r:.40}, not an object")
    return MappingProxyType(layers)


def _layer_name(prefix: str) -> str:
    return prefix[:-1] if prefix.endswith(".") else prefix


class ComfyLegacyFormat(ComfyConfigFormat):
    name = COMFY_LEGACY
    priority = 20  # per layer, but from the header: after a layer's own comfy_quant tensor
    summary = SUMMARIES[COMFY_LEGACY]

    def owns_layer(self, keys: Container[str], prefix: str, file_metadata: Mapping[str, str] | None) -> bool:
        return _layer_name(prefix) in comfy_legacy_layers(file_metadata)

    def owns_header_key(self, key: str) -> bool:
        return key == COMFY_LEGACY_KEY

    def layer_config(self, tensors, prefix, file_metadata) -> dict:
        return comfy_legacy_layers(file_metadata)[_layer_name(prefix)]
