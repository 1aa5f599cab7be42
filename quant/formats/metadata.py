"""Our header metadata: what every file the converter writes says about itself, whatever its layer layout.

safetensors metadata maps str -> str; lists travel as JSON strings. Readers use the recorded block size as
the default when they infer a block scale's block size (:func:`recorded_block_size`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..._version import __version__
from ...kernels.int8 import DEFAULT_BLOCK_SIZE

META_PREFIX = "headroom."
META_FORMAT_VERSION = "headroom.format_version"
META_METHOD = "headroom.method"
META_BLOCK_SIZE = "headroom.block_size"
META_LAYOUT = "headroom.layout"
META_QUANTIZED = "headroom.quantized_layers"
META_SKIPPED = "headroom.skipped_layers"
META_SKIP_REASONS = "headroom.skip_reasons"
META_SOURCE_FILE = "headroom.source_file"
META_SOURCE_HASH = "headroom.source_sha256_of_header_and_size"
META_TOOL_VERSION = "headroom.tool_version"
META_ROTATION_GROUP = "headroom.rotation_group"
META_LORAS = "headroom.loras"
FORMAT_VERSION = "1"


def is_headroom_metadata(file_metadata: Mapping[str, str] | None) -> bool:
    """True when headroom wrote the file (its header carries our format version)."""
    return bool(file_metadata) and META_FORMAT_VERSION in file_metadata


def conversion_metadata(kept_metadata: Mapping[str, str], *, method: str, block_size: int, layout: str,
                        quantized: Sequence[str], kept: Mapping[str, str], source_file: str,
                        source_hash: str | None = None, rotation_group: int = 0,
                        loras: Sequence[str] = ()) -> dict[str, str]:
    """The header metadata of a converted file: what the input had that still holds (``kept_metadata``) and ours:
    method, block size, layout, the quantized and the kept layers (with why), the source and the tool."""
    metadata = dict(kept_metadata)
    metadata.setdefault("format", "pt")
    metadata.update({
        META_FORMAT_VERSION: FORMAT_VERSION,
        META_METHOD: method,
        META_BLOCK_SIZE: str(block_size),
        META_LAYOUT: layout,
        META_QUANTIZED: json.dumps(list(quantized)),
        META_SKIPPED: json.dumps(sorted(kept)),
        META_SKIP_REASONS: json.dumps(dict(kept), sort_keys=True),
        META_SOURCE_FILE: source_file,
        META_TOOL_VERSION: __version__,
    })
    if source_hash:
        metadata[META_SOURCE_HASH] = source_hash
    if rotation_group:
        metadata[META_ROTATION_GROUP] = str(rotation_group)
    if loras:
        metadata[META_LORAS] = json.dumps(list(loras))
    return metadata


def recorded_block_size(file_metadata: Mapping[str, str] | None) -> int:
    """The block size the file's header records (ours), else the default."""
    return int((file_metadata or {}).get(META_BLOCK_SIZE, DEFAULT_BLOCK_SIZE))
