"""plan_placement: fits, clamps, blocks_resident, critical blocks, multi-GPU invariants, errors."""

import json
import random

import pytest

from comfyui_headroom.memory import PlanError, default_budget_bytes, module_bytes, plan_placement
from comfyui_headroom.quant.skip import DEFAULT_SKIP_PATTERNS
from test_memory_models import TinyCausalLM, TinyFlux, make_dit


@pytest.fixture(scope="module")
def dit():
    return make_dit(depth=8)


def _sizes(model):
    block = module_bytes(model.blocks[0])
    head = module_bytes(model.patch_embed) + module_bytes(model.time_embed)
    tail = module_bytes(model.final_layer)
    return block, head, tail


def test_everything_fits(dit):
    plan = plan_placement(dit, 10 ** 9)
    assert plan.streamed == [] and plan.stream_device is None
    assert len(plan.resident_blocks("cuda:0")) == 8
    names = [n for n, _ in plan.devices[0].modules]
    assert names[:2] == ["patch_embed", "time_embed"] and names[-1] == "final_layer"
    assert plan.devices[0].bytes == module_bytes(dit)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_budget_keeps_exactly_the_blocks_that_fit(dit, k):
    block, head, tail = _sizes(dit)
    ring = 2 * block  # prefetch 1 -> 2 slots
    budget = head + tail + ring + k * block
    plan = plan_placement(dit, budget, prefetch=1, order="first")
    assert plan.resident_blocks() == [f"blocks.{i}" for i in range(k)]
    assert plan.streamed_blocks() == [f"blocks.{i}" for i in range(k, 8)]
    assert plan.devices[0].ring_bytes == ring and plan.devices[0].bytes <= budget
    if k:
        one_less = plan_placement(dit, budget - 1, prefetch=1)
        assert len(one_less.resident_blocks()) == k - 1


def test_prefetch_enlarges_the_ring(dit):
    block, head, tail = _sizes(dit)
    budget = head + tail + 3 * block + 2 * block
    assert len(plan_placement(dit, budget, prefetch=1).resident_blocks()) == 3
    plan = plan_placement(dit, budget, prefetch=2)
    assert plan.ring_slots == 3 and len(plan.resident_blocks()) == 2


def test_blocks_resident_caps_even_with_room(dit):
    plan = plan_placement(dit, 10 ** 9, blocks_resident=3, order="first")
    assert plan.resident_blocks() == ["blocks.0", "blocks.1", "blocks.2"]
    assert len(plan.streamed) == 5


@pytest.mark.parametrize("keep,expected", [(4, [0, 2, 4, 6]), (2, [0, 4]), (1, [0]), (7, [0, 1, 2, 3, 4, 5, 6])])
def test_spread_interleaves_streamed_blocks_between_resident_ones(dit, keep, expected):
    plan = plan_placement(dit, 10 ** 9, blocks_resident=keep)  # order="spread" is the default
    assert plan.resident_blocks() == [f"blocks.{i}" for i in expected]
    block, head, tail = _sizes(dit)
    budget = head + tail + 3 * block + keep * block  # default prefetch 2 -> 3 slots
    by_budget = plan_placement(dit, budget)
    if keep + 3 >= 8:  # the ring would cost as much as the blocks: everything fits, nothing streams
        assert by_budget.streamed == []
    else:
        assert by_budget.resident_blocks() == [f"blocks.{i}" for i in expected]
    assert by_budget.devices[0].bytes <= budget


def test_bad_order_is_an_error(dit):
    with pytest.raises(ValueError, match="order"):
        plan_placement(dit, 10 ** 9, order="random")


def test_critical_blocks_are_never_streamed(dit):
    plan = plan_placement(dit, 10 ** 9, critical=("blocks.6",), blocks_resident=2)
    assert plan.resident_blocks() == ["blocks.0", "blocks.6"]  # blocks_resident counts the critical ones
    assert "blocks.6" not in plan.streamed_blocks()
    assert any("critical" in w for w in plan_placement(dit, 10 ** 9, critical=("blocks.",), blocks_resident=2).warnings)


def test_default_budget_is_55_percent_of_total(dit):
    total = 10 * module_bytes(dit)
    assert default_budget_bytes(total) == int(0.55 * total)
    plan = plan_placement(dit, None, device_totals={"cuda:0": total})
    assert plan.devices[0].budget_bytes == int(0.55 * total)
    with pytest.raises(PlanError, match="device_totals"):
        plan_placement(dit, None)


def test_budget_above_the_card_is_clamped_with_a_warning(dit):
    total = module_bytes(dit) // 2
    plan = plan_placement(dit, 10 ** 9, device_totals=total)
    assert plan.devices[0].budget_bytes == total and plan.devices[0].bytes <= total
    assert any("above the card" in w and "clamped" in w for w in plan.warnings)


def test_budget_below_the_critical_minimum_is_raised_with_a_warning(dit):
    block, head, tail = _sizes(dit)
    plan = plan_placement(dit, 100, device_totals=10 ** 9)
    assert plan.devices[0].budget_bytes == head + tail + 3 * block  # ring of 3 slots (prefetch 2)
    assert plan.resident_blocks() == [] and len(plan.streamed) == 8
    assert any("raised to" in w for w in plan.warnings)
    with pytest.raises(PlanError, match="the card has"):
        plan_placement(dit, 100, device_totals=head)


def test_multi_device_errors_name_the_numbers(dit):
    with pytest.raises(PlanError, match="3 budgets given for 2 devices"):
        plan_placement(dit, [1, 2, 3], devices=["cuda:0", "cuda:1"])
    with pytest.raises(PlanError, match="sum to .* below the"):
        plan_placement(dit, {"cuda:0": 10, "cuda:1": 10})
    with pytest.raises(PlanError, match="budgets name devices"):
        plan_placement(dit, {"cuda:0": 10}, devices=["cuda:1"])


def test_two_gpus_fill_in_order_and_tail_follows_last_block(dit):
    block, head, tail = _sizes(dit)
    plan = plan_placement(dit, {"cuda:0": head + 3 * block, "cuda:1": 10 ** 9})
    assert plan.resident_blocks("cuda:0") == ["blocks.0", "blocks.1", "blocks.2"]
    assert plan.resident_blocks("cuda:1") == [f"blocks.{i}" for i in range(3, 8)]
    assert plan.device_of("patch_embed") == "cuda:0" and plan.device_of("final_layer") == "cuda:1"
    assert plan.streamed == []


def _check_invariants(model, plan):
    units = [u.name for u in plan.units]
    placed = [n for dp in plan.devices for n, _ in dp.modules] + plan.streamed_blocks()
    assert sorted(placed) == sorted(units) and len(placed) == len(set(placed))  # each exactly once
    for dp in plan.devices:
        assert dp.bytes <= dp.budget_bytes, str(plan)
    resident = plan.resident_blocks()
    first = plan.device_of(resident[0]) if resident else plan.devices[0].device
    last = plan.device_of(resident[-1]) if resident else plan.devices[0].device
    assert plan.device_of("patch_embed") == first and plan.device_of("time_embed") == first
    assert plan.device_of("final_layer") == last
    if plan.streamed:
        assert plan.stream_device == last
        order = [plan.devices.index(next(d for d in plan.devices if d.device == plan.device_of(n))) for n in resident]
        assert order == sorted(order)  # consecutive blocks, devices in order


@pytest.mark.parametrize("n_devices", range(1, 9))
def test_random_uneven_budgets_keep_the_invariants(dit, n_devices):
    rng = random.Random(n_devices)
    block, head, tail = _sizes(dit)
    for _ in range(20):
        budgets = {f"cuda:{i}": rng.randint(0, 4) * block + rng.randint(0, block) + (head + tail + 2 * block if i == 0 else 0)
                   for i in range(n_devices)}
        try:
            plan = plan_placement(dit, budgets, prefetch=1)
        except PlanError as err:
            assert "cannot place" in str(err) or "below the" in str(err)
            continue
        _check_invariants(dit, plan)
        json.dumps(plan.as_dict())
        assert "cuda:0" in str(plan)


def test_transformers_layout_and_auto_detection():
    lm = TinyCausalLM(depth=4)
    plan = plan_placement(lm, 10 ** 9, DEFAULT_SKIP_PATTERNS, blocks_resident=1)
    assert plan.block_names == [f"model.layers.{i}" for i in range(4)]
    names = {u.name: u for u in plan.units}
    assert names["model.wte"].kind == "head" and names["model.ln_f"].kind == "tail" and names["lm_head"].kind == "tail"
    assert names["lm_head"].critical and names["model.wte"].critical  # the caller's patterns: the default skip list
    assert not any(u.critical for u in plan_placement(lm, 10 ** 9, blocks_resident=1).units)  # memory has no list
    explicit = plan_placement(lm, 10 ** 9, DEFAULT_SKIP_PATTERNS, blocks="model.layers", blocks_resident=1)
    assert explicit.as_dict() == plan.as_dict()


def test_flux_double_then_single_blocks_in_order():
    plan = plan_placement(TinyFlux(3, 4), 10 ** 9, blocks_resident=4, order="first")
    assert plan.block_names[:3] == ["double_blocks.0", "double_blocks.1", "double_blocks.2"]
    assert plan.resident_blocks()[-1] == "single_blocks.0"
    assert plan.streamed_blocks() == ["single_blocks.1", "single_blocks.2", "single_blocks.3"]


def test_a_plain_list_of_blocks():
    dit = make_dit(depth=4)
    plan = plan_placement(list(dit.blocks), 10 ** 9, blocks_resident=2)
    assert plan.resident_blocks() == ["0", "2"] and plan.streamed_blocks() == ["1", "3"]


def test_no_block_list_is_a_clear_error():
    import torch.nn as nn

    with pytest.raises(ValueError, match="no block list found"):
        plan_placement(nn.Sequential(nn.Linear(4, 4)), 10 ** 9)
