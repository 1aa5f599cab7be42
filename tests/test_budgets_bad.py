"""Numbers and device names from users (memory/budgets.py, planner.py, estimate.py, kernels/dispatch.check_device):
every bad value is a ValueError that names it and says what is accepted."""

import json
import re

import pytest
import torch
from comfyui_headroom.kernels.dispatch import check_device
from comfyui_headroom.memory.budgets import (
    parse_device_budgets,
    parse_devices,
    parse_gpu_budgets,
)
from comfyui_headroom.memory.estimate import (
    CalibrationStore,
    estimate_inference_vram_gb,
    megapixels,
    should_offload,
)
from comfyui_headroom.memory.planner import (
    PlanError,
    default_budget_bytes,
    plan_placement,
)
from torch import nn

GiB = 1024 ** 3
H200 = 140 * GiB


# ---------------------------------------------------------------------------------------------------------
# GPU budgets
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("inf", r"the budget of cuda:0 is inf; accepted: 0\.001 to 1,024 GB \(above the card's 140\.00 GB it is clamped "
            r"to the card\), or 0 = 55 % of the card"),
    ("+inf", "the budget of cuda:0 is inf"),
    ("nan", "the budget of cuda:0 is nan; accepted"),
    ("-1", r"the budget of cuda:0 is -1\.0; accepted"),
    ("1025", r"the budget of cuda:0 is 1025\.0; accepted: 0\.001 to 1,024 GB"),
    ("1e9", r"is 1000000000\.0"),
    ("1e-12", r"is 1e-12; accepted: 0\.001"),
    ("40,,40", "has an empty field"),
    ("40 GB", r"\['40 GB'\] are not all numbers \('40 GB' is not\)"),
    ("0x10", "are not all numbers"),
    ("", "has an empty field"),
])
def test_gpu_budgets_out_of_range_are_refused_with_the_accepted_range(text, message):
    with pytest.raises(ValueError, match=rf"gpu_budgets_gb={re.escape(repr(text))}.*{message}"):
        parse_gpu_budgets(text, 1, device_totals=[H200])


@pytest.mark.parametrize("value", [True, None, float("inf"), float("nan"), [40, "x"], [40, None], 1e7, {"a": 1}])
def test_gpu_budgets_that_are_not_numbers_or_absurd_are_refused_without_totals(value):
    with pytest.raises(ValueError, match=r"gpu_budgets_gb="):
        parse_gpu_budgets(value, 1)


def test_gpu_budgets_still_accept_what_they_did():
    assert parse_gpu_budgets("40,40", 2) == {0: 40 * GiB, 1: 40 * GiB}
    assert parse_gpu_budgets("0,10", 2, device_totals=[H200, H200]) == {0: int(H200 * 0.55), 1: 10 * GiB}
    assert parse_gpu_budgets("140", 1, device_totals=[H200]) == {0: 140 * GiB}  # the whole card is allowed
    assert parse_gpu_budgets("24", 2, device_totals=[H200]) == {0: 24 * GiB, 1: 24 * GiB}  # total of cuda:1 unknown


@pytest.mark.parametrize("text, message", [
    ("inf", r"the budget of cuda:0 is inf; accepted: 0\.001 to 1,024 GB$"),
    ("nan", "the budget of cuda:0 is nan"),
    ("-1", r"the budget of cuda:0 is -1\.0"),
    ("0", r"the budget of cuda:0 is 0\.0; accepted: 0\.001 to"),
    ("40,,40", "has an empty field"),
    ("40,", "has an empty field"),
    ("1e7", r"is 10000000\.0"),
    ("abc", "are not all numbers"),
])
def test_device_budgets_out_of_range_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_device_budgets(text, ["cuda:0", "cuda:1"], device_totals=[None, None])


def test_budgets_above_the_card_are_clamped_to_it_with_a_warning(caplog):
    """As the planner does: a budget above a card leaves no VRAM for inference, but it is a budget."""
    with caplog.at_level("WARNING"):
        assert parse_device_budgets("40,100", ["cuda:0", "cuda:1"], device_totals=[80 * GiB, 80 * GiB]) == \
            [40 * GiB, 80 * GiB]
        assert parse_gpu_budgets("141", 1, device_totals=[H200]) == {0: H200}
    assert caplog.text.count("clamped to the card") == 2 and "cuda:1 budget: 100.0 GB" in caplog.text
    assert parse_device_budgets("40,80", ["cuda:0", "cuda:1"], device_totals=[80 * GiB, 80 * GiB]) == [40 * GiB, 80 * GiB]
    assert parse_device_budgets(" ", ["cuda:0", "cuda:1"]) is None


# ---------------------------------------------------------------------------------------------------------
# Device names
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, count, message", [
    ("cuda:7,cuda:0", 1, r"cuda:7 does not exist \(1 CUDA GPU\(s\) present: cuda:0\.\.cuda:0\)"),
    ("cuda:0,cuda:1", 0, "cuda:0 does not exist .*no CUDA GPU is present"),
    ("npu:0,cuda:0", 2, r"'npu:0' is not a device headroom runs on: write cpu, cuda or cuda:N"),
    ("cuda:x,cuda:0", 2, r"'cuda:x' is not a device"),
    ("cuda:-1,cuda:0", 2, r"'cuda:-1' is not a device"),
    ("cuda:\u0661,cuda:0", 2, "is not a device"),  # an Arabic-Indic digit passed str.isdigit()
    ("mps,cpu", 2, r"'mps' is not a device"),
    ("cuda:0,,cuda:1", 2, "has an empty field"),
    ("cuda:0,cuda:1,", 2, "has an empty field"),
    ("cuda:00,cuda:0", 2, r"names a GPU twice \(cuda:0, cuda:0\)"),  # was two "different" devices
    ("cuda,cuda:0", 2, "names a GPU twice"),
])
def test_devices_that_do_not_exist_are_refused(text, count, message):
    with pytest.raises(ValueError, match=message):
        parse_devices(text, count)


@pytest.mark.parametrize("value", [5, ["cuda:0", "cuda:1"]])
def test_devices_that_are_not_text_are_refused(value):
    with pytest.raises(ValueError, match="expected text such as 'cuda:0,cuda:1'"):
        parse_devices(value, 2)


def test_check_device_knows_this_machine():
    assert check_device("cpu") == torch.device("cpu") and check_device(" CPU ") == torch.device("cpu")
    assert check_device("cuda:1", device_count=2) == torch.device("cuda", 1)
    assert check_device("1", device_count=2) == torch.device("cuda", 1)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"cuda:{count} does not exist"):
        check_device(f"cuda:{count}")
    if not count:
        with pytest.raises(ValueError, match=r"cuda does not exist \(no CUDA GPU is present.*\); use cpu"):
            check_device("cuda")
    for text in ("npu:0", "cuda:x", "", "meta", None, 3):
        with pytest.raises(ValueError, match="is not a device headroom runs on"):
            check_device(text)


# ---------------------------------------------------------------------------------------------------------
# Planner
# ---------------------------------------------------------------------------------------------------------

def _blocks():
    return nn.ModuleList([nn.Linear(64, 64) for _ in range(4)])


@pytest.mark.parametrize("budgets, options, message", [
    (float("nan"), {}, "the budget of cuda:0 is nan; expected a number of bytes >= 0"),
    (float("inf"), {}, "the budget of cuda:0 is inf"),
    (-5, {}, "the budget of cuda:0 is -5"),
    ([10 ** 6, float("nan")], {"devices": ["cpu", "cpu"]}, "the budget of cpu is nan"),
    ({"cuda:0": float("inf")}, {}, "the budget of cuda:0 is inf"),
    (None, {"device_totals": float("nan")}, r"the total of cuda:0 is nan; expected a number of bytes > 0"),
    (None, {"device_totals": 0}, "the total of cuda:0 is 0"),
    (None, {"device_totals": {"cuda:0": -1}}, r"device_totals\['cuda:0'\] is -1"),
])
def test_planner_budgets_and_totals_out_of_range_are_plan_errors(budgets, options, message):
    with pytest.raises(PlanError, match=message):
        plan_placement(_blocks(), budgets, **options)


@pytest.mark.parametrize("options, message", [
    ({"prefetch": float("nan")}, "prefetch must be a whole number >= 1, got nan"),
    ({"prefetch": 0}, "prefetch must be a whole number >= 1, got 0"),
    ({"prefetch": 1.5}, "got 1.5"),
    ({"blocks_resident": float("nan")}, "blocks_resident must be a whole number >= 0, got nan"),
    ({"blocks_resident": -1}, "got -1"),
])
def test_planner_counts_out_of_range_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(_blocks(), 10 ** 6, **options)


@pytest.mark.parametrize("args, message", [
    ((80 * GiB, float("nan")), "budget fraction nan: expected a number above 0 and at most 1"),
    ((80 * GiB, 2.0), "budget fraction 2.0"),
    ((80 * GiB, 0), "budget fraction 0"),
    ((80 * GiB, -0.5), "budget fraction -0.5"),
    ((float("inf"),), "total VRAM is inf"),
    ((float("nan"),), "total VRAM is nan"),
    ((0,), "total VRAM is 0"),
])
def test_default_budget_refuses_fractions_and_totals_out_of_range(args, message):
    with pytest.raises(ValueError, match=message):
        default_budget_bytes(*args)


# ---------------------------------------------------------------------------------------------------------
# Inference estimate, offload decision, calibration
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height", [(float("nan"), 512), (512, float("inf")), (0, 512), (-5, 512), (10 ** 6, 512),
                                           (True, 512), ("512", 512)])
def test_image_sizes_out_of_range_are_refused(width, height):
    with pytest.raises(ValueError, match=r"image size must be positive, 1 to 65536 pixels per side"):
        megapixels(width, height)


@pytest.mark.parametrize("options, message", [
    ({"loader_reserve_gb": float("nan")}, r"loader_reserve_gb=nan: expected a number from 0 to 1,000,000"),
    ({"loader_reserve_gb": -1.0}, "loader_reserve_gb=-1.0"),
    ({"per_mp_gb": float("inf")}, "per_mp_gb=inf"),
    ({"exponent": 0}, r"exponent=0: expected a number from 0 \(excluded\) to 4"),
    ({"exponent": float("nan")}, "exponent=nan"),
    ({"base_gb": -5}, "base_gb=-5"),
])
def test_estimate_terms_out_of_range_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        estimate_inference_vram_gb(1024, 1024, **options)


@pytest.mark.parametrize("free, total, options, message", [
    (float("nan"), 80 * GiB, {}, "free_bytes=nan"),
    (10 * GiB, float("nan"), {}, "total_bytes=nan"),
    (10 * GiB, float("inf"), {}, "total_bytes=inf"),
    (10 * GiB, 80 * GiB, {"min_free_gb": float("nan")}, "min_free_gb=nan"),
    (10 * GiB, 80 * GiB, {"max_used_pct": 150}, r"max_used_pct=150: expected a number from 0 to 100"),
    (10 * GiB, 80 * GiB, {"max_used_pct": float("nan")}, "max_used_pct=nan"),
    (10 * GiB, 80 * GiB, {"quantized_switch_mp": -1}, "quantized_switch_mp=-1"),
])
def test_offload_decision_inputs_out_of_range_are_refused(free, total, options, message):
    with pytest.raises(ValueError, match=message):
        should_offload(1024, 1024, free, total, **options)


def test_a_nan_measurement_never_enters_the_calibration(tmp_path):
    store = CalibrationStore(path=str(tmp_path / "cal.json"))
    with pytest.raises(ValueError, match="m: peak_bytes=nan"):
        store.record_run("m", 1024, 1024, float("nan"), 0)
    with pytest.raises(ValueError, match="m: weights_bytes=-1"):
        store.record_run("m", 1024, 1024, 10 * GiB, -1)
    assert store.runs == {} and not (tmp_path / "cal.json").exists()
    store.record_run("m", 1024, 1024, 20 * GiB, 4 * GiB)
    assert CalibrationStore(path=str(tmp_path / "cal.json")).runs == store.runs


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot be read"),
    ("[1, 2]", "has no 'runs' table"),
    (json.dumps({"runs": {"m": [[1.0]]}}), r"the runs of 'm' are not \[megapixels, GB\] pairs"),
    ('{"runs": {"m": [[1.0, NaN]]}}', "the runs of 'm' hold a NaN, infinite or negative value"),
    (json.dumps({"runs": {"m": [[-1.0, 3.0]]}}), "NaN, infinite or negative"),
])
def test_a_damaged_calibration_file_names_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"calibration file {path}.*{message}.*delete {path} to start the calibration over"):
        CalibrationStore(path=str(path))
    assert path.read_text() == content


def test_calibration_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="exponent=nan"):
        CalibrationStore(exponent=float("nan"))
    with pytest.raises(ValueError, match="default_base_gb=-1"):
        CalibrationStore(default_base_gb=-1)


def test_device_budgets_are_all_checked_when_fewer_totals_are_known():
    with pytest.raises(ValueError, match=r"the budget of cuda:1 is 1000000000\.0; accepted: 0\.001 to 1,024 GB"):
        parse_device_budgets("40,1e9", ["cuda:0", "cuda:1"], device_totals=[80 * GiB])
