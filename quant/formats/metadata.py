"""Our header metadata: what every file the converter writes says about itself, whatever its layer layout.

safetensors metadata maps str -> str; lists travel as JSON strings. Readers use the recorded block size as
the default when they infer a block scale's block size (:func:`recorded_block_size`). A file is data from anywhere:
every field is checked where it is read (:func:`check_headroom_metadata`), and a damaged one is refused naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Mapping, Sequence

from ..._version import __version__
from ...kernels.int8 import DEFAULT_BLOCK_SIZE, METHODS
from ...kernels.rotation import ROTATION_GROUPS
from ..safetensors_stream import FormatError

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


MAX_BLOCK_SIZE = 2**20
_WORD = re.compile(r"[a-z0-9_]{1,64}")


def is_headroom_metadata(file_metadata: Mapping[str, str] | None) -> bool:
    """True when headroom wrote the file (its header carries our format version)."""
    return bool(file_metadata) and META_FORMAT_VERSION in file_metadata


def _damaged(key: str, value: object, expected: str) -> FormatError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return FormatError(f"header field '{key}' is {shown}, not {expected}: the file's metadata is damaged; "
                       f"convert the original again")


def _whole_number(key: str, raw: object, allowed: Container[int] | None = None, limit: int = MAX_BLOCK_SIZE) -> int:
    # plain ASCII digits only: int() would also take " 12", "1_000", "١٢" and choke on 5000 digits
    if not isinstance(raw, str) or not re.fullmatch(r"[0-9]{1,9}", raw) or not 1 <= int(raw) <= limit \
            or (allowed is not None and int(raw) not in allowed):
        what = f"one of {', '.join(map(str, allowed))}" if allowed is not None else f"a whole number from 1 to {limit}"
        raise _damaged(key, raw, what)
    return int(raw)


def _json(key: str, raw: str, kind: type, expected: str):
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested deeper than Python's stack
        raise _damaged(key, raw, expected) from None
    if not isinstance(value, kind):
        raise _damaged(key, raw, expected)
    return value


def check_format_version(file_metadata: Mapping[str, str] | None) -> None:
    """FormatError when our header names a format version this headroom does not read (a newer one, or garbage)."""
    version = (file_metadata or {}).get(META_FORMAT_VERSION)
    if version is None or version == FORMAT_VERSION:
        return
    if isinstance(version, str) and re.fullmatch(r"[0-9]{1,6}", version) and int(version) > int(FORMAT_VERSION):
        raise FormatError(f"header field '{META_FORMAT_VERSION}' is {version!r}: the file was written by a newer "
                          f"headroom (this one reads version {FORMAT_VERSION}); update comfyui-headroom")
    raise _damaged(META_FORMAT_VERSION, version, f"{FORMAT_VERSION!r}")


def check_headroom_metadata(file_metadata: Mapping[str, str] | None) -> None:
    """FormatError naming the field when one of our ``headroom.*`` header fields is not what the converter writes:
    the method one of ours, the block size and rotation group whole numbers in range, the layer lists JSON lists
    of names, the reasons a JSON object of names. (Fields we do not know are left alone.)"""
    if not is_headroom_metadata(file_metadata):
        return
    check_format_version(file_metadata)
    md = file_metadata
    if META_METHOD in md and md[META_METHOD] not in METHODS:
        raise _damaged(META_METHOD, md[META_METHOD], f"one of {', '.join(METHODS)}")
    if META_BLOCK_SIZE in md:
        _whole_number(META_BLOCK_SIZE, md[META_BLOCK_SIZE])
    if META_ROTATION_GROUP in md:
        _whole_number(META_ROTATION_GROUP, md[META_ROTATION_GROUP], ROTATION_GROUPS)
    if META_LAYOUT in md and not _WORD.fullmatch(md[META_LAYOUT]):
        raise _damaged(META_LAYOUT, md[META_LAYOUT], "a layout name")
    for key in (META_QUANTIZED, META_SKIPPED, META_LORAS):
        if key in md:
            recorded_names(md, key)
    if META_SKIP_REASONS in md:
        reasons = _json(META_SKIP_REASONS, md[META_SKIP_REASONS], dict, "a JSON object of layer -> reason")
        if not all(isinstance(v, str) for v in reasons.values()):
            raise _damaged(META_SKIP_REASONS, md[META_SKIP_REASONS], "a JSON object of layer -> reason")


def recorded_names(file_metadata: Mapping[str, str], key: str) -> list[str]:
    """A checked list of names in our header (``META_QUANTIZED``, ``META_SKIPPED``, ``META_LORAS``)."""
    names = _json(key, file_metadata[key], list, "a JSON list of names")
    if not all(isinstance(n, str) for n in names):
        raise _damaged(key, file_metadata[key], "a JSON list of names")
    return names


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
    """The block size the file's header records (ours), else the default; FormatError when it is damaged."""
    raw = (file_metadata or {}).get(META_BLOCK_SIZE)
    return DEFAULT_BLOCK_SIZE if raw is None else _whole_number(META_BLOCK_SIZE, raw)
