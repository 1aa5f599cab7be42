"""Give back the RAM pages of a memory-mapped checkpoint tensor once we are done with it.

Why (seed 003): safetensors hands out tensors that are views into a memory map of the file. Every page we
read while quantizing stays mapped - and counted in the process's RSS - until the last tensor of that
file is freed, which in ComfyUI's loader is the end of the whole load. Quantizing a 40 GB bf16 checkpoint
would then show 40 GB of RSS, on top of the INT8 result.

``release_file_pages(t)`` drops the page mappings of ``t``'s bytes (``madvise(MADV_DONTNEED)``). It only
ever does so when those bytes lie inside a *file-backed* mapping of this process (checked against
``/proc/self/maps``): there the pages are clean copies of the file, so dropping them loses nothing - a
later read simply faults them back in. Anonymous memory is never touched (there, the same call would zero
the data). On systems without ``/proc`` or ``madvise`` the function does nothing and returns 0.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
import threading

import torch

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE

_lock = threading.Lock()
_file_ranges: list[tuple[int, int]] = []  # sorted (start, end) of file-backed mappings
_starts: list[int] = []
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name or not hasattr(os, "sysconf"):
            _libc = False
        else:
            libc = ctypes.CDLL(name, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _libc = libc
    return _libc or None


def _read_file_mappings() -> None:
    """Refresh the list of file-backed mappings (``/proc/self/maps`` lines with an inode != 0)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[4] == "0":
                    continue  # anonymous, heap, stack
                start, end = (int(v, 16) for v in fields[0].split("-"))
                ranges.append((start, end))
    except OSError:
        ranges = []
    ranges.sort()
    _file_ranges[:] = ranges
    _starts[:] = [r[0] for r in ranges]


def _inside_file_mapping(start: int, end: int) -> bool:
    i = bisect.bisect_right(_starts, start) - 1
    return i >= 0 and _file_ranges[i][0] <= start and end <= _file_ranges[i][1]


def release_file_pages(tensor: torch.Tensor | None) -> int:
    """Drop the resident pages of a file-mapped CPU tensor; returns the bytes released (0 when not mapped)."""
    if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    libc = _madvise()
    if libc is None:
        return 0
    ptr = tensor.data_ptr()
    nbytes = tensor.numel() * tensor.element_size()
    start = -(-ptr // PAGE) * PAGE  # whole pages inside the tensor only: neighbours keep theirs
    end = ((ptr + nbytes) // PAGE) * PAGE
    if end <= start:
        return 0
    with _lock:
        if not _inside_file_mapping(start, end):
            _read_file_mappings()
            if not _inside_file_mapping(start, end):
                return 0
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) != 0:
            return 0
    return end - start
