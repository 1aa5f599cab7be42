"""Read and write safetensors one tensor at a time, so no model ever has to fit in RAM.

Reading goes through ``safetensors.safe_open`` (header, dtypes and shapes without touching data; tensors
memory-mapped on demand). A memory-mapped page that was read stays in the process's RSS for as long as the
file is open, so :class:`TensorReader` reopens the file every few hundred MB: the pages of tensors we are
done with are then released and RSS stays flat whatever the file size.

Writing: ``safetensors.torch.save_file`` wants every tensor in memory at once, so :class:`StreamingWriter`
writes the format itself - 8-byte little-endian header length, the JSON header (dtype, shape, data offsets,
``__metadata__``), then each tensor's raw bytes in header order - computing the header from the planned
shapes first. The result is checked by reopening it with ``safe_open`` (:func:`verify_file`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# safetensors dtype names <-> torch dtypes (the names the header uses).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPE_NAMES[getattr(torch, _attr)] = _name
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
HEADER_ALIGNMENT = 8
REOPEN_EVERY_BYTES = 256 * 2**20


class FormatError(ValueError):
    """The file is not something we can read (the message says which file and what to do)."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it (no data read)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class Header:
    """What ``safe_open`` tells without reading tensor data: metadata and, per tensor, dtype and shape."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save: a zip archive ("PK\x03\x04") or a raw pickle (protocol marker 0x80).
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def pickle_refusal(path: Path) -> str:
    return (f"{path} is a pickle checkpoint ({path.suffix or 'torch.save'}); headroom refuses pickles for safety "
            f"(loading one can run arbitrary code). Convert it to safetensors first, in an environment you trust: "
            f"`sd = torch.load(path, weights_only=True); safetensors.torch.save_file(sd, 'model.safetensors')`")


def check_readable_file(path: str | os.PathLike) -> Path:
    """The path as a Path, or FormatError when it is missing or not a regular file."""
    path = Path(path)
    try:
        if not path.exists():
            raise FormatError(f"{path} does not exist")
        if not path.is_file():
            raise FormatError(f"{path} is not a file")
        with open(path, "rb"):
            pass
    except OSError as err:  # permission denied, a name too long...
        raise FormatError(f"{path} cannot be read: {err.strerror or err}") from None
    return path


def read_header(path: str | os.PathLike) -> Header:
    """Metadata, dtypes and shapes of a safetensors file through ``safe_open`` (no tensor data read)."""
    path = check_readable_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():
                piece = f.get_slice(key)
                name = piece.get_dtype()
                if name not in DTYPES_BY_NAME:
                    raise FormatError(f"{path}: tensor '{key}' has dtype {name}, which torch cannot hold here")
                tensors[key] = TensorInfo(DTYPES_BY_NAME[name], tuple(piece.get_shape()))
    except SafetensorError as err:
        if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
            raise FormatError(pickle_refusal(path)) from None
        raise FormatError(f"{path} is not a valid safetensors file (truncated or corrupt header: {err}); "
                          f"re-download or re-export it") from None
    return Header(path, metadata, tensors)


def raw_header_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's raw header bytes plus its size: a cheap identity for multi-GB files."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        digest = hashlib.sha256(f.read(length))
    digest.update(struct.pack("<Q", size))
    return digest.hexdigest()


class TensorReader(Mapping):
    """A lazy ``{name: tensor}`` view of a safetensors file.

    Tensors come memory-mapped from ``safe_open``; the file is reopened after every
    ``REOPEN_EVERY_BYTES`` handed out, so pages of tensors the caller has dropped leave RSS.
    """

    def __init__(self, path: str | os.PathLike, header: Header | None = None) -> None:
        self.header = header or read_header(path)
        self.path = self.header.path
        self._handle = None
        self._bytes_since_open = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]  # KeyError for unknown names, as a Mapping should
        if self._handle is None or self._bytes_since_open > REOPEN_EVERY_BYTES:
            self.close()
            self._handle = safe_open(str(self.path), framework="pt")
        self._bytes_since_open += info.nbytes
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def close(self) -> None:
        self._handle = None
        self._bytes_since_open = 0

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamingWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front.

    ``write(name, tensor)`` must be called once per planned tensor, in plan order; ``close()`` checks
    that every tensor was written. The header is written first, so memory never holds more than the
    tensor being written.
    """

    def __init__(self, path: str | os.PathLike, plan: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._plan = list(plan.items())
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise ValueError(f"safetensors metadata must map str to str; bad entries: {bad[:3]}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, info in self._plan:
            if info.dtype not in DTYPE_NAMES:
                raise ValueError(f"cannot store tensor '{name}' of dtype {info.dtype} in safetensors")
            header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % HEADER_ALIGNMENT)  # pad with spaces, as safetensors does
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise ValueError(f"tensor '{name}' was not planned for {self.path}")
        planned, info = self._plan[self._next]
        if name != planned:
            raise ValueError(f"tensor '{name}' written out of order; expected '{planned}'")
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned {info.dtype} {info.shape}")
        if info.numel:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self, sync: bool = True) -> None:
        """Flush (and with ``sync`` fsync) to disk; raises if some planned tensor was never written."""
        if self._file.closed:
            return
        try:
            if self._next != len(self._plan):
                missing = [n for n, _ in self._plan[self._next:]]
                raise ValueError(f"{len(missing)} planned tensors were not written to {self.path} "
                                 f"(first: '{missing[0]}')")
            self._file.flush()
            if sync:  # the converter renames the file into place next: its bytes must be on disk first
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close without checking; never raises (it runs while another error is on its way: a full disk fails the
        final flush too)."""
        try:
            self._file.close()
        except OSError:
            pass


def verify_file(path: str | os.PathLike, plan: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None) -> None:
    """Reopen a written file with ``safe_open``: every planned tensor present with its dtype and shape."""
    header = read_header(path)
    missing = [k for k in plan if k not in header.tensors]
    extra = [k for k in header.tensors if k not in plan]
    if missing or extra:
        raise ValueError(f"{path}: written file differs from the plan (missing {missing[:3]}, extra {extra[:3]})")
    for name, info in plan.items():
        if header.tensors[name] != info:
            raise ValueError(f"{path}: tensor '{name}' is {header.tensors[name]}, planned {info}")
    for key, value in (metadata or {}).items():
        if header.metadata.get(key) != value:
            raise ValueError(f"{path}: metadata '{key}' was not written correctly")
