"""Everything :mod:`comfyui_headroom.quant.formats` exports, with the built-in formats registered (the package
loads this module on first use of any of its names, so that :mod:`.builtin` comes without torch)."""

from ...kernels.int8 import normalise_scale
from .comfy import (
    COMFY_INT8_FORMAT,
    COMFY_QUANT_SUFFIX,
    ComfyFormat,
    comfy_quant_config,
    decode_comfy_quant,
    encode_comfy_quant,
    int8_config,
    layer_comfy_format,
    rotation_group_of,
)
from .comfy_legacy import COMFY_LEGACY_KEY, ComfyLegacyFormat, comfy_legacy_layers
from .files import (
    INDEX_SUFFIX,
    FileInfo,
    ShardIndex,
    checkpoint_files,
    describe_header,
    detect_format,
    merge_infos,
    model_groups,
    read_index,
    safetensors_files,
    separate_models_note,
)
from .headroom import HeadroomFormat
from .metadata import (
    FORMAT_VERSION,
    META_BLOCK_SIZE,
    META_FORMAT_VERSION,
    META_LAYOUT,
    META_LORAS,
    META_METHOD,
    META_QUANTIZED,
    META_ROTATION_GROUP,
    META_SKIP_REASONS,
    META_SKIPPED,
    META_SOURCE_FILE,
    META_SOURCE_HASH,
    META_TOOL_VERSION,
    conversion_metadata,
    is_headroom_metadata,
    recorded_block_size,
)
from .plain import PlainFormat
from .registry import (
    FP8_MARKER_KEY,
    INPUT_SCALE_SUFFIXES,
    SCALE_SUFFIXES,
    Int8Format,
    Int8LayerTensors,
    find_scale_key,
    get_format,
    layer_format,
    layout_names,
    parse_int8_layer,
    quantization_keys,
    register,
    registered_formats,
    unregister,
    writable_formats,
)

# The built-in formats. Registration order is the order of the --layout choices; detection order is by priority.
register(HeadroomFormat())
register(ComfyFormat())
register(ComfyLegacyFormat())
register(PlainFormat())

__all__ = [
    "COMFY_INT8_FORMAT", "COMFY_LEGACY_KEY", "COMFY_QUANT_SUFFIX", "FORMAT_VERSION", "FP8_MARKER_KEY",
    "INDEX_SUFFIX", "INPUT_SCALE_SUFFIXES", "META_BLOCK_SIZE", "META_FORMAT_VERSION", "META_LAYOUT", "META_LORAS", "META_METHOD",
    "META_QUANTIZED", "META_ROTATION_GROUP", "META_SKIPPED", "META_SKIP_REASONS", "META_SOURCE_FILE",
    "META_SOURCE_HASH", "META_TOOL_VERSION", "SCALE_SUFFIXES",
    "ComfyFormat", "ComfyLegacyFormat", "FileInfo", "HeadroomFormat", "Int8Format", "Int8LayerTensors",
    "PlainFormat", "ShardIndex",
    "checkpoint_files", "comfy_legacy_layers", "comfy_quant_config", "conversion_metadata", "decode_comfy_quant",
    "describe_header", "detect_format", "encode_comfy_quant", "find_scale_key", "get_format", "int8_config",
    "is_headroom_metadata", "layer_comfy_format", "layer_format", "layout_names", "merge_infos", "model_groups", "normalise_scale",
    "parse_int8_layer", "quantization_keys", "read_index", "recorded_block_size", "register", "registered_formats",
    "rotation_group_of", "safetensors_files", "separate_models_note", "unregister", "writable_formats",
]
