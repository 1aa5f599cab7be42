"""Disk tier: streamed blocks read from their safetensors file(s) on every pass, through a small pinned ring.

Why: a model larger than RAM (HunyuanImage-3 INT8 is ~81 GB, our users have 64-128 GB) cannot keep every
streamed block in pinned RAM. A disk block owns no host memory; per pass it is read into one of a few
pinned buffers by a background thread, running ahead of the GPU copy stream, so disk, PCIe and compute overlap.

* Where a tensor is: ``safe_open`` parses and validates the header (dtypes, shapes, and - the format forbids
  holes - tensors packed back to back in ``offset_keys()`` order after the 8-byte length and the header), so a
  tensor's file offset is the sum of the sizes before it. No second header parser.
* One read per block: the file range from the block's first to its last tensor is read with one
  ``os.preadv`` straight into the block's flat layout (tensor by tensor, at the aligned offsets the GPU slot
  uses; bytes of other tensors in between land in a scratch buffer). A block whose tensors are far apart
  (gap > ``MAX_GAP_BYTES``) is read in a few runs.
* The page cache: after each read ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops the pages just read, so a
  streamed model does not pile up as "cached" RAM on top of our pinned buffers (the kernel would give them back
  under pressure, but they push out other pages first and make RSS + cache look like twice the model).
  Not O_DIRECT: it needs block-aligned offsets, lengths and buffers, which safetensors tensors are not, and
  tmpfs and several network/FUSE filesystems refuse it; large reads followed by DONTNEED cost the same.
* Files must not change under a running model: every read first compares the file's size, mtime and inode
  with what was recorded when the model was planned; a changed or truncated file is a :class:`DiskTierError`
  naming the file and the block, never garbage weights.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant.safetensors_stream import FormatError, read_header
from .tensors import FlatLayout

MAX_GAP_BYTES = 1 << 20  # bytes of other tensors read and thrown away rather than starting a second read


CACHE_ENV = "HEADROOM_CACHE"


def cache_root() -> Path:
    """``$HEADROOM_CACHE`` if set, else ``~/.cache/comfyui-headroom``: where headroom keeps what it writes once and
    reads again (the INT8 files the disk tier streams from, the demo's checkpoints)."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "comfyui-headroom"


class DiskTierError(RuntimeError):
    """A disk-tier block cannot be read as planned (the message names the file, the block and what to do)."""


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's bytes cheaply: size, mtime and inode."""

    path: Path
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        st = os.stat(path)
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino)

    def check(self, block: str) -> None:
        try:
            now = FileStamp.of(self.path)
        except OSError as err:
            raise DiskTierError(f"{self.path}: cannot read block {block} from disk ({err.strerror or err}); the "
                                "file was moved or deleted while the model was loaded - reload the model") from None
        if now != self:
            what = "is shorter than" if now.size < self.size else "changed since"
            raise DiskTierError(f"{self.path} {what} when the model was loaded (size {self.size} -> {now.size} "
                                f"bytes, mtime or inode changed); block {block} is read from it on every step - "
                                "reload the model (or restore the file)")


@dataclass(frozen=True)
class TensorLocation:
    file: int  # index into SafetensorsSource.stamps
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsSource:
    """Where every tensor of one or more safetensors files is on disk. ``prefix`` is put before a module's
    tensor name to find its key (``"model.diffusion_model."`` for ComfyUI-style files).

    ``stacked(name, shape)`` (optional): for a module tensor the files do not hold under its own name, the names
    (without ``prefix``) of the file tensors that, stacked along dim 0 in that order, make it - or None. A model
    that keeps ``E`` per-expert ``[out, in]`` weights as one ``[E, out, in]`` tensor reads them this way, as
    stored (each part must have the tensor's dtype and ``numel / E`` elements)."""

    def __init__(self, files, prefix: str = "", stacked=None):
        self.stacked = stacked
        paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
        if not paths:
            raise ValueError("SafetensorsSource needs at least one safetensors file")
        self.prefix = prefix
        self.stamps: list[FileStamp] = []
        self.tensors: dict[str, TensorLocation] = {}
        from safetensors import safe_open

        for index, path in enumerate(paths):
            header = read_header(path)  # FormatError naming the file for anything unreadable
            stamp = FileStamp.of(header.path)
            with open(header.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
            with safe_open(str(header.path), framework="pt") as f:
                order = f.offset_keys()
            offset = 8 + header_len
            for key in order:
                info = header.tensors[key]
                if key in self.tensors:
                    raise FormatError(f"tensor '{key}' is in both {self.stamps[self.tensors[key].file].path} and "
                                      f"{header.path}; pass each model file once")
                self.tensors[key] = TensorLocation(index, offset, info.nbytes, info.dtype, info.shape)
                offset += info.nbytes
            if offset != stamp.size:
                raise FormatError(f"{header.path}: the header describes {offset} bytes but the file has {stamp.size}; "
                                  "re-download or re-export it")
            self.stamps.append(stamp)

    def locate(self, key: str) -> TensorLocation | None:
        return self.tensors.get(self.prefix + key)


@dataclass
class BlockRead:
    """How to fill one block's flat buffer from disk: per run a file offset and the pieces it splits into
    (destination offset in the flat buffer, or None for bytes of other tensors, and a length)."""

    name: str
    file: FileStamp
    runs: list[tuple[int, list[tuple[int | None, int]]]]
    nbytes: int  # bytes read from the file (incl. gaps)
    flat_bytes: int  # size of the flat buffer it fills


def plan_block_read(name: str, layout: FlatLayout, source: SafetensorsSource) -> BlockRead:
    """The reads that fill ``layout`` (one block's tensors, in its module order) from ``source``.

    DiskTierError when a tensor is missing from the files or stored with another dtype or shape (the model
    changed it on load: quantize it once into a file - ``headroom convert`` - and stream that file)."""
    found = []
    for ref, dest, size, dtype, shape in zip(layout.refs, layout.offsets, layout.sizes, layout.dtypes, layout.shapes):
        loc = source.locate(f"{name}.{ref.name}")
        files = ", ".join(str(s.path) for s in source.stamps)
        if loc is None:
            parts = _stacked_parts(source, f"{name}.{ref.name}", dest, size, dtype, shape)
            if parts is not None:
                found.extend(parts)
                continue
            raise DiskTierError(f"block {name}: tensor '{source.prefix}{name}.{ref.name}' is not in {files}; the "
                                "disk tier reads blocks exactly as stored - keep this block in RAM (raise "
                                "ram_budget_gb) or stream from the file the model was loaded from")
        if loc.dtype != dtype or tuple(loc.shape) != tuple(shape):
            raise DiskTierError(f"block {name}: tensor '{source.prefix}{name}.{ref.name}' is {loc.dtype} "
                                f"{tuple(loc.shape)} in {source.stamps[loc.file].path} but {dtype} {tuple(shape)} in "
                                "the model (converted while loading); quantize the model once into a file "
                                "(headroom convert) and stream from that file, or raise ram_budget_gb")
        found.append((loc, dest, size))
    if not found:
        raise DiskTierError(f"block {name} has no tensors to read from disk")
    file_ids = {loc.file for loc, _, _ in found}
    if len(file_ids) > 1:
        raise DiskTierError(f"block {name} is split over several files "
                            f"({', '.join(str(source.stamps[i].path) for i in sorted(file_ids))}); keep it in RAM")
    found.sort(key=lambda item: item[0].offset)
    runs: list[tuple[int, list[tuple[int | None, int]]]] = []
    end = None
    for loc, dest, size in found:
        if end is None or loc.offset - end > MAX_GAP_BYTES or loc.offset < end:
            runs.append((loc.offset, []))
        elif loc.offset > end:
            runs[-1][1].append((None, loc.offset - end))
        runs[-1][1].append((dest, size))
        end = loc.offset + size
    nbytes = sum(n for _, pieces in runs for _, n in pieces)
    return BlockRead(name, source.stamps[found[0][0].file], runs, nbytes, layout.nbytes)


def _stacked_parts(source: SafetensorsSource, key: str, dest: int, size: int, dtype: torch.dtype, shape):
    """(location, destination, bytes) of the file tensors that make ``key`` stacked along dim 0, or None when
    ``source.stacked`` names none that are all in the files. DiskTierError when they are there but do not fit."""
    names = source.stacked(key, tuple(shape)) if source.stacked is not None and len(shape) >= 1 else None
    if not names:
        return None
    locs = [source.locate(n) for n in names]
    if any(loc is None for loc in locs):
        return None
    if len(names) != shape[0] or size % len(names):
        raise DiskTierError(f"tensor '{source.prefix}{key}' {tuple(shape)} cannot be stacked from {len(names)} file "
                            f"tensors ({source.prefix}{names[0]} ...); keep this block in RAM (raise ram_budget_gb)")
    part = size // len(names)
    for part_name, loc in zip(names, locs):
        if loc.dtype != dtype or loc.nbytes != part:
            raise DiskTierError(f"tensor '{source.prefix}{part_name}' is {loc.dtype} {tuple(loc.shape)} in "
                                f"{source.stamps[loc.file].path} but the model stacks it as {dtype} {tuple(shape[1:])} "
                                f"into '{key}' (converted while loading); quantize the model once into a file "
                                "(headroom convert) and stream from that file, or raise ram_budget_gb")
    return [(loc, dest + e * part, part) for e, loc in enumerate(locs)]


def _drop_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # a filesystem without fadvise: the kernel reclaims the pages under pressure instead
            pass


def _no_readahead(fd: int) -> None:
    """Blocks are read whole, in one call each: the kernel's readahead past a read would only put pages of the next
    tensors into the page cache, which :func:`_drop_cache` does not drop."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass


def read_block(read: BlockRead, dest: torch.Tensor, scratch: torch.Tensor, fds: dict) -> int:
    """Fill ``dest`` (a uint8 CPU buffer of at least ``read.flat_bytes``) from disk; -> bytes read.
    ``scratch``: a uint8 buffer of at least ``MAX_GAP_BYTES`` for the bytes between tensors."""
    read.file.check(read.name)
    fd = fds.get(read.file.path)
    if fd is None:
        fd = fds[read.file.path] = os.open(read.file.path, os.O_RDONLY)
        _no_readahead(fd)
    dest_np, scratch_np = dest.numpy(), scratch.numpy()
    total = 0
    for offset, pieces in read.runs:
        buffers = [memoryview(scratch_np[:n] if d is None else dest_np[d:d + n]) for d, n in pieces if n]
        want = sum(n for _, n in pieces)
        got = 0
        while got < want:
            n = os.preadv(fd, _advance(buffers, got), offset + got)
            if n <= 0:
                raise DiskTierError(f"{read.file.path}: read of block {read.name} stopped at byte {offset + got} of "
                                    f"the file (truncated?); reload the model (or restore the file)")
            got += n
        _drop_cache(fd, offset, want)
        total += want
    read.file.check(read.name)  # changed while we read: the bytes may mix two files
    return total


def read_block_once(read: BlockRead, dest: torch.Tensor) -> int:
    """:func:`read_block` outside the reader thread (a block loaded once, or read back at teardown)."""
    fds: dict = {}
    try:
        return read_block(read, dest, torch.empty(MAX_GAP_BYTES, dtype=torch.uint8), fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def _advance(buffers: list[memoryview], skip: int) -> list[memoryview]:
    """The buffers after the first ``skip`` bytes (a short read continues where it stopped)."""
    out = []
    for b in buffers:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:])
        skip = 0
    return out


@dataclass
class DiskStats:
    reads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # time the reader thread spent in reads
    wait_s: float = 0.0  # time the compute side waited for a block
    discarded: int = 0  # blocks read ahead but not used (an out-of-order call)

    @property
    def gb_per_s(self) -> float | None:
        return self.bytes_read / 2**30 / self.read_s if self.read_s > 0 else None

    def as_dict(self) -> dict:
        return dict(self.__dict__, gb_per_s=self.gb_per_s)


@dataclass
class _Ready:
    index: int
    buffer: int
    error: BaseException | None = None


@dataclass
class _Buffer:
    tensor: torch.Tensor
    event: object | None = None  # CUDA event: the GPU copy out of this buffer is done


class DiskReader:
    """A background thread that reads disk blocks in their execution order (cyclically) into a ring of
    buffers, ahead of the consumer. :meth:`take` hands over block ``index``'s buffer (waiting for it),
    :meth:`release` gives it back (after ``event``, the GPU copy out of it, when given)."""

    def __init__(self, reads: dict[int, BlockRead], order: list[int], slots: int, pin_memory: bool):
        if not order:
            raise ValueError("DiskReader needs at least one block")
        self.reads = reads
        self.order = list(order)
        size = max(reads[i].flat_bytes for i in order)
        self._buffers = [_Buffer(torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory))
                         for _ in range(min(slots, len(order)))]
        self._scratch = torch.empty(MAX_GAP_BYTES, dtype=torch.uint8)
        self._free = deque(range(len(self._buffers)))
        self._ready: deque[_Ready] = deque()
        self._inflight: int | None = None
        self._next = 0  # position in order of the next block to read
        self._generation = 0
        self._closed = False
        self._fds: dict = {}
        self.stats = DiskStats()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="headroom-disk-reader", daemon=True)
        self._thread.start()

    @property
    def ring_bytes(self) -> int:
        return sum(b.tensor.numel() for b in self._buffers)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._free:
                    self._cond.wait()
                if self._closed:
                    return
                buffer_id = self._free.popleft()
                index = self.order[self._next]
                self._next = (self._next + 1) % len(self.order)
                generation = self._generation
                self._inflight = index
            buffer = self._buffers[buffer_id]
            error = None
            try:
                if buffer.event is not None:
                    buffer.event.synchronize()  # the GPU copy out of this buffer has finished
                    buffer.event = None
                start = time.perf_counter()
                n = read_block(self.reads[index], buffer.tensor, self._scratch, self._fds)
                seconds = time.perf_counter() - start
            except BaseException as err:  # handed to the consumer, raised in its thread
                error, n, seconds = err, 0, 0.0
            with self._cond:
                self._inflight = None
                self.stats.reads += 1 if error is None else 0
                self.stats.bytes_read += n
                self.stats.read_s += seconds
                if generation != self._generation or self._closed:
                    self._free.append(buffer_id)
                else:
                    self._ready.append(_Ready(index, buffer_id, error))
                self._cond.notify_all()

    def _discard_front(self, count: int) -> None:
        for _ in range(count):
            self._free.append(self._ready.popleft().buffer)
            self.stats.discarded += 1

    def _pop(self, index: int) -> tuple[int, torch.Tensor] | None:
        """Block ``index``'s buffer if it is read (blocks read before it are dropped), else None."""
        for pos, item in enumerate(self._ready):
            if item.index == index:
                self._discard_front(pos)
                self._ready.popleft()
                self._cond.notify_all()
                if item.error is not None:
                    self._free.append(item.buffer)
                    raise item.error
                return item.buffer, self._buffers[item.buffer].tensor
        return None

    def try_take(self, index: int) -> tuple[int, torch.Tensor] | None:
        """Block ``index``'s buffer if it has been read already, else None (prefetch must not wait)."""
        with self._cond:
            return self._pop(index)

    def take(self, index: int) -> tuple[int, torch.Tensor]:
        """Block ``index``'s buffer, waiting for the read; an out-of-order request restarts the read-ahead there."""
        start = time.perf_counter()
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the disk reader is closed")
                got = self._pop(index)
                if got is not None:
                    self.stats.wait_s += time.perf_counter() - start
                    return got
                if self._inflight != index:  # the read-ahead went elsewhere: restart it at index
                    self._discard_front(len(self._ready))
                    self._generation += 1 if self._inflight is not None else 0
                    self._next = self.order.index(index)
                    self._cond.notify_all()
                self._cond.wait()

    def release(self, buffer_id: int, event=None) -> None:
        with self._cond:
            self._buffers[buffer_id].event = event
            self._free.append(buffer_id)
            self._cond.notify_all()

    def read_into(self, index: int, dest: torch.Tensor) -> int:
        """Read block ``index`` straight into ``dest`` on the caller's thread (teardown: bring a block back)."""
        return read_block_once(self.reads[index], dest)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        for buffer in self._buffers:
            if buffer.event is not None:
                buffer.event.synchronize()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._ready.clear()


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` that holds one element (stride 0): what a disk block's parameters
    point at between its reads, so the block owns no RAM."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def file_pages_cached(path) -> int | None:
    """Bytes of ``path`` in the page cache (``mincore`` over a read-only map of it); None where that cannot be
    asked. What the tests and the bench use to show that the disk tier does not fill the page cache."""
    import ctypes
    import ctypes.util
    import mmap

    import numpy as np

    name = ctypes.util.find_library("c")
    size = os.path.getsize(path)
    if not name or not hasattr(mmap, "PAGESIZE"):
        return None
    if size == 0:
        return 0
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = np.zeros(pages, dtype=np.uint8)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)  # its address only: mincore does not fault pages in
        try:
            ok = libc.mincore(view.ctypes.data, size, vec.ctypes.data) == 0
        finally:
            del view
    return int((vec & 1).sum()) * mmap.PAGESIZE if ok else None
