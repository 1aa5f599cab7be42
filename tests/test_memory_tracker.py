"""MemoryTracker: fields, RSS sampling, the status-line format (CPU: VRAM n/a)."""

import re
import time

import pytest
import torch

from comfyui_headroom.memory import MemoryReport, MemoryTracker
from comfyui_headroom.memory.tracker import DevicePeak

GB = 1024 ** 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_run_records_ram_time_and_says_vram_na():
    with MemoryTracker(interval_s=0.01) as tracker:
        block = torch.ones(64 * 1024 * 1024, dtype=torch.float32)  # 256 MB, touched
        block += 1
        time.sleep(0.15)
        del block
    report = tracker.report
    assert report.devices == {} and report.peak_vram_bytes is None
    assert report.peak_rss_bytes - report.start_rss_bytes >= 200 * 1024 ** 2
    assert report.wall_s >= 0.15
    assert report.samples >= 5  # the background thread sampled while we slept
    assert re.fullmatch(r"Peak VRAM n/a \| Peak RAM \d+\.\dGB \| \d+\.\ds", str(report))
    d = report.as_dict()
    assert d["peak_vram_bytes"] is None and d["peak_rss_bytes"] == report.peak_rss_bytes


def _peak(name, alloc):
    return DevicePeak(name, alloc, alloc + GB, 0, 0)


def test_status_line_single_and_multi_gpu():
    one = MemoryReport({"cuda:0": _peak("cuda:0", int(27.8 * GB))}, int(42.1 * GB), 0, 73.2)
    assert str(one) == "Peak VRAM 27.8GB | Peak RAM 42.1GB | 73.2s"
    two = MemoryReport({"cuda:0": _peak("cuda:0", int(38.2 * GB)), "cuda:1": _peak("cuda:1", int(36.9 * GB))},
                       int(42.1 * GB), 0, 73.2)
    assert str(two) == "Peak VRAM cuda:0 38.2GB, cuda:1 36.9GB | Peak RAM 42.1GB | 73.2s"
    assert two.peak_vram_bytes == int(38.2 * GB)
    assert two.peak_reserved_bytes == int(38.2 * GB) + GB


def test_interval_must_be_at_most_50ms():
    with pytest.raises(ValueError, match="interval_s"):
        MemoryTracker(interval_s=0.2)


def test_tracker_reports_even_when_the_run_fails():
    tracker = MemoryTracker()
    with pytest.raises(RuntimeError):
        with tracker:
            raise RuntimeError("boom")
    assert tracker.report is not None and tracker.report.wall_s >= 0
