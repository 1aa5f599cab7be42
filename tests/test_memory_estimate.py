"""Inference estimate, calibration and every smart-offload rule at its boundary."""

import pytest

from comfyui_headroom.memory import CalibrationStore, estimate_inference_vram_gb, record_run, should_offload

GB = 1024 ** 3


def test_default_estimate_is_12_per_mp_plus_5_plus_reserve():
    assert estimate_inference_vram_gb(1000, 1000) == pytest.approx(17.0)
    assert estimate_inference_vram_gb(1920, 1080, loader_reserve_gb=3) == pytest.approx(12 * 2.0736 + 5 + 3)
    assert estimate_inference_vram_gb(1000, 2000, exponent=1.4, per_mp_gb=10, base_gb=0) == pytest.approx(10 * 2 ** 1.4)


def test_linear_default_fits_seed_001_table_better_than_its_power_formula():
    table = [((1024, 1024), 12), ((1920, 1080), 22), ((2560, 1440), 45)]
    for (w, h), measured in table:
        linear = estimate_inference_vram_gb(w, h)
        power = estimate_inference_vram_gb(w, h, exponent=1.4)
        assert abs(linear - measured) <= abs(power - measured)


def test_bad_size_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        estimate_inference_vram_gb(0, 512)


def test_rule_free_below_minimum_boundary():
    total = 200 * GB
    at = should_offload(512, 512, 25 * GB, total)
    assert at.rule != "free_below_min"
    below = should_offload(512, 512, 25 * GB - 1, total)
    assert below.offload and below.rule == "free_below_min" and "25 GB minimum" in below.reason


def test_rule_used_above_percent_boundary():
    total = 100 * GB
    at = should_offload(512, 512, 30 * GB, total)  # exactly 70 % used
    assert not at.offload and at.rule == "fits"
    above = should_offload(512, 512, 30 * GB - 1, total)
    assert above.offload and above.rule == "used_above_pct" and "> 70 %" in above.reason


def test_rule_free_below_estimate_boundary():
    total = 100 * GB  # estimate at 1 MP with reserve 23 = 12 + 5 + 23 = 40 GB
    at = should_offload(1000, 1000, 40 * GB, total, loader_reserve_gb=23)
    assert not at.offload and at.rule == "fits" and at.estimate_gb == pytest.approx(40)
    below = should_offload(1000, 1000, 40 * GB - 1, total, loader_reserve_gb=23)
    assert below.offload and below.rule == "free_below_estimate" and "40.0 GB" in below.reason


def test_fits_says_why_not():
    d = should_offload(1024, 1024, 60 * GB, 80 * GB)
    assert not d.offload and not d and d.rule == "fits" and d.reason.startswith("no offload")


def test_modes_always_and_disabled():
    assert should_offload(64, 64, 79 * GB, 80 * GB, mode="always").offload
    d = should_offload(4096, 4096, 1 * GB, 80 * GB, mode="disabled")
    assert not d.offload and d.rule == "disabled"


def test_disabled_int8_above_1_2_mp_switches_to_smart():
    at = should_offload(1200, 1000, 10 * GB, 80 * GB, mode="disabled", quantized=True)  # exactly 1.2 MP
    assert not at.offload and at.rule == "disabled"
    above = should_offload(1201, 1000, 10 * GB, 80 * GB, mode="disabled", quantized=True)
    assert above.offload and above.mode == "smart" and above.rule == "int8_switch_to_smart+free_below_min"
    assert "switched to 'smart'" in above.reason
    roomy = should_offload(1201, 1000, 70 * GB, 80 * GB, mode="disabled", quantized=True)
    assert not roomy.offload and roomy.rule == "int8_switch_to_smart+fits" and "switched" in roomy.reason


def test_thresholds_are_parameters():
    assert should_offload(512, 512, 20 * GB, 200 * GB).offload
    assert not should_offload(512, 512, 20 * GB, 200 * GB, min_free_gb=10, max_used_pct=95).offload


def test_input_errors():
    with pytest.raises(ValueError, match="mode"):
        should_offload(512, 512, GB, 2 * GB, mode="sometimes")
    with pytest.raises(ValueError, match="free_bytes"):
        should_offload(512, 512, 3 * GB, 2 * GB)


def test_calibration_one_run_and_reason_says_so():
    store = CalibrationStore()
    weights = 40 * GB
    cal = record_run("hy3-int8", 1000, 1000, weights + 30 * GB, weights, store=store)
    assert cal.per_mp_gb == pytest.approx(25.0) and cal.base_gb == pytest.approx(5.0)
    d = should_offload(2000, 1000, 50 * GB, 100 * GB, model_id="hy3-int8", store=store)
    assert d.estimate_gb == pytest.approx(55.0)
    assert d.offload and d.rule == "free_below_estimate" and "calibrated from 1 measured run" in d.reason
    uncalibrated = should_offload(2000, 1000, 50 * GB, 100 * GB, model_id="other", store=store)
    assert not uncalibrated.offload and "calibrated" not in uncalibrated.reason


def test_calibration_fits_base_and_slope_from_two_sizes(tmp_path):
    path = str(tmp_path / "cal.json")
    store = CalibrationStore(path=path)
    store.record_run("m", 1000, 1000, 17 * GB, 0)
    store.record_run("m", 2000, 1000, 29 * GB, 0)
    cal = store.calibration("m")
    assert cal.per_mp_gb == pytest.approx(12.0) and cal.base_gb == pytest.approx(5.0) and cal.runs == 2
    again = CalibrationStore(path=path)  # persisted
    assert again.calibration("m").per_mp_gb == pytest.approx(12.0)
    again.forget("m")
    assert again.calibration("m") is None
