"""MemoryTracker: peak VRAM (per CUDA device), peak process RAM and wall time of one run.

Seed 000's status line: ``Peak VRAM 27.8GB | Peak RAM 42.1GB | 73.2s``. "GB" here is 1024**3 bytes, as in
the seeds (they divide by ``1024**3``).

VRAM peaks come from torch's caching allocator (``max_memory_allocated`` / ``max_memory_reserved``), whose
peak counters are reset when the tracker starts - another tracker running at the same time in the same
process shares those counters. RAM is the process RSS, sampled by a daemon thread every ``interval_s``
(<= 50 ms by default) plus once at start and end; a spike shorter than the interval can be missed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from ..kernels.dispatch import check_device
from ..units import GB
from .estimate import number_in

MIN_INTERVAL_S = 0.001  # a shorter period would keep a core busy sampling
MAX_INTERVAL_S = 0.05


class TrackerError(RuntimeError):
    """A :class:`MemoryTracker` used out of order (entered while running, exited without being entered)."""


def _gb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GB:.1f}GB"


@dataclass
class DevicePeak:
    device: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    start_allocated_bytes: int
    end_allocated_bytes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MemoryReport:
    """What a :class:`MemoryTracker` measured. ``devices`` is empty on a machine without CUDA."""

    devices: dict[str, DevicePeak] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0
    wall_s: float = 0.0
    samples: int = 0

    @property
    def peak_vram_bytes(self) -> int | None:
        """Highest allocated peak over all devices (None without CUDA)."""
        if not self.devices:
            return None
        return max(d.peak_allocated_bytes for d in self.devices.values())

    @property
    def peak_reserved_bytes(self) -> int | None:
        if not self.devices:
            return None
        return max(d.peak_reserved_bytes for d in self.devices.values())

    def vram_text(self) -> str:
        if not self.devices:
            return "Peak VRAM n/a"
        if len(self.devices) == 1:
            return f"Peak VRAM {_gb(next(iter(self.devices.values())).peak_allocated_bytes)}"
        parts = ", ".join(f"{name} {_gb(d.peak_allocated_bytes)}" for name, d in self.devices.items())
        return f"Peak VRAM {parts}"

    def __str__(self) -> str:
        return f"{self.vram_text()} | Peak RAM {_gb(self.peak_rss_bytes)} | {self.wall_s:.1f}s"

    def as_dict(self) -> dict:
        return {
            "devices": {name: d.as_dict() for name, d in self.devices.items()},
            "peak_vram_bytes": self.peak_vram_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "start_rss_bytes": self.start_rss_bytes,
            "wall_s": self.wall_s,
            "samples": self.samples,
        }


class MemoryTracker:
    """Context manager: ``with MemoryTracker() as t: run(); print(t.report)``.

    ``devices``: CUDA device indices (or ``torch.device``/strings) to watch; default all visible ones; a GPU this
    machine does not have is a ValueError. ``interval_s``: RSS sampling period, 0.001 to 0.05 s.

    One run at a time: entering a tracker that is running (nested ``with`` on the same object) or leaving one
    that was not entered is a :class:`TrackerError`; a tracker can be entered again after it exited.
    """

    def __init__(self, devices=None, interval_s: float = 0.05):
        number_in("interval_s (seconds)", interval_s, MIN_INTERVAL_S, MAX_INTERVAL_S)
        self.interval_s = interval_s
        self._devices = self._resolve_devices(devices)
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_rss = 0
        self._samples = 0
        self._t0 = 0.0
        self._start_alloc: dict[int, int] = {}
        self.report: MemoryReport | None = None

    @staticmethod
    def _resolve_devices(devices) -> list[int]:
        if devices is None:
            return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        if isinstance(devices, (str, int, torch.device)):
            devices = [devices]
        out = []
        for dev in devices:
            text = f"cuda:{dev}" if isinstance(dev, int) and not isinstance(dev, bool) else \
                str(dev) if isinstance(dev, (str, torch.device)) else dev
            try:
                device = check_device(text)
            except ValueError as err:
                raise ValueError(f"MemoryTracker(devices={devices!r}): {err}") from None
            if device.type == "cuda" and device.index not in out:
                out.append(device.index)
        return out

    def _sample(self) -> None:
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:  # process info unavailable (exotic platforms): keep what we have
            return
        self._samples += 1
        if rss > self._peak_rss:
            self._peak_rss = rss

    def _run_sampler(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "MemoryTracker":
        if self._thread is not None:
            raise TrackerError("this MemoryTracker is already running (entered twice, or nested in itself); use a "
                               "second MemoryTracker for a nested measurement")
        self.report = None
        self._peak_rss = 0
        self._samples = 0
        self._sample()
        self._start_rss = self._peak_rss
        for index in self._devices:
            torch.cuda.synchronize(index)
            torch.cuda.reset_peak_memory_stats(index)
            self._start_alloc[index] = torch.cuda.memory_allocated(index)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_sampler, name="headroom-rss-sampler", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is None:
            raise TrackerError("MemoryTracker exited without being entered: use it as `with MemoryTracker() as t:`")
        for index in self._devices:
            try:
                torch.cuda.synchronize(index)
            except RuntimeError:  # a failed kernel (e.g. after an OOM) must not hide the run's own error
                pass
        wall = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        devices = {}
        for index in self._devices:
            devices[f"cuda:{index}"] = DevicePeak(
                device=f"cuda:{index}",
                peak_allocated_bytes=torch.cuda.max_memory_allocated(index),
                peak_reserved_bytes=torch.cuda.max_memory_reserved(index),
                start_allocated_bytes=self._start_alloc.get(index, 0),
                end_allocated_bytes=torch.cuda.memory_allocated(index),
            )
        self.report = MemoryReport(devices=devices, peak_rss_bytes=self._peak_rss,
                                   start_rss_bytes=self._start_rss, wall_s=wall, samples=self._samples)

    def __str__(self) -> str:
        return str(self.report) if self.report is not None else "MemoryTracker (running)"
