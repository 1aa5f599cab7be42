"""MemoryTracker (memory/tracker.py) used out of order or with nonsense settings: a clear error, and a run that
was going on still ends properly."""

import pytest
from comfyui_headroom.memory.tracker import MemoryTracker, TrackerError


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), 1e9, 1e-6, "0.01", True, None])
def test_a_nonsense_sampling_interval_is_refused(interval):
    with pytest.raises(ValueError, match=r"interval_s \(seconds\)=.*: expected a number from 0\.001 to 0\.05"):
        MemoryTracker(interval_s=interval)


def test_entering_a_running_tracker_again_is_an_error_and_the_outer_run_still_ends():
    tracker = MemoryTracker(interval_s=0.01)
    with pytest.raises(TrackerError, match="already running"):
        with tracker:
            with tracker:  # noqa: SIM117 - the same object, entered twice
                pass
    assert tracker.report is not None and tracker._thread is None  # the outer run ended, its sampler stopped
    with tracker:  # and it can run again
        pass
    assert tracker.report.samples >= 2


def test_exiting_a_tracker_that_was_not_entered_is_an_error():
    with pytest.raises(TrackerError, match="exited without being entered"):
        MemoryTracker().__exit__(None, None, None)


def test_two_trackers_may_nest():
    with MemoryTracker(interval_s=0.01) as outer:
        with MemoryTracker(interval_s=0.01) as inner:  # noqa: SIM117 - the nesting is the point
            pass
    assert outer.report is not None and inner.report is not None


@pytest.mark.parametrize("devices, message", [
    (["npu:0"], "'npu:0' is not a device"),
    (["cuda:x"], "'cuda:x' is not a device"),
    ([1.5], "1.5 is not a device"),
    ([-1], "'cuda:-1' is not a device"),
    (["cuda:64"], "cuda:64 does not exist"),
])
def test_tracker_devices_that_do_not_exist_are_refused(devices, message):
    with pytest.raises(ValueError, match=rf"MemoryTracker\(devices=.*\): {message}"):
        MemoryTracker(devices=devices)
