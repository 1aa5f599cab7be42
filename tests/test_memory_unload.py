"""Soft unload / restore round trips (CPU: pin_memory off) and force unload's parts."""

import sys
import types
import weakref

import pytest
import torch
from comfyui_headroom.integrations.comfyui.memory import unload_comfy_models
from comfyui_headroom.memory import force_unload, register_cache, release_pinned, restore, soft_unload, unregister_cache
from comfyui_headroom.memory.unload import find_orphans, free_tensors, soft_unload_handle
from test_memory_models import make_dit
from torch import nn


def _inside_any(tensor, buffers):
    return any(b.data_ptr() <= tensor.data_ptr() < b.data_ptr() + b.numel() for b in buffers)


@pytest.mark.parametrize("int8,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_round_trip_identical_and_really_relocated(int8, dtype, gen):
    model = make_dit(depth=3, int8=int8, dtype=dtype)
    x = torch.randn(2, 6, 16, generator=gen).to(dtype)
    with torch.no_grad():
        expected = model(x)
    handle = soft_unload(model, pin_memory=False, chunk_bytes=64 * 1024)
    assert len(handle.chunks) > 1 and handle.state == "parked" and not handle.pinned
    hosts = [c.host for c in handle.chunks]
    for p in list(model.parameters()) + list(model.buffers()):
        assert _inside_any(p, hosts)
    assert model.blocks[0].fc1.weight.dtype == (torch.int8 if int8 else dtype)
    assert soft_unload(model, pin_memory=False) is handle  # already parked: no-op
    restore(model, "cpu")
    assert handle.state == "restored"
    for p in model.parameters():
        assert not _inside_any(p, hosts)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_buffers_are_reused_across_cycles(gen):
    model = make_dit(depth=2, int8=True)
    x = torch.randn(1, 3, 16, generator=gen)
    with torch.no_grad():
        expected = model(x)
    first = soft_unload(model, pin_memory=False)
    host_ptrs = [c.host.data_ptr() for c in first.chunks]
    for _ in range(3):
        restore(model)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
        handle = soft_unload(model, pin_memory=False)
        assert handle is first and handle.reused
        assert [c.host.data_ptr() for c in handle.chunks] == host_ptrs
    restore(model)
    assert release_pinned(model) and soft_unload_handle(model) is None


def test_changed_weights_are_carried_and_shapes_change_rebuilds(gen):
    model = make_dit(depth=2)
    soft_unload(model, pin_memory=False)
    restore(model)
    with torch.no_grad():
        model.blocks[0].fc1.weight.add_(1.0)  # e.g. a merged LoRA
    changed = model.blocks[0].fc1.weight.clone()
    soft_unload(model, pin_memory=False)
    restore(model)
    assert torch.equal(model.blocks[0].fc1.weight, changed)
    model.blocks[1].fc1 = nn.Linear(64, 128)  # a different layout: new buffers
    handle = soft_unload(model, pin_memory=False)
    assert not handle.reused


def test_bnb_int8_layers_round_trip_with_their_scales_and_weight_aliases(gen):
    """LLM.int8 keeps its int8 weight a second time (weight.CB before the first forward, state.CB after it) and
    its scales outside the parameters (weight.SCB / state.SCB): all of it lands in the flat buffers and back."""
    import copy

    bnb = pytest.importorskip("bitsandbytes")
    model = nn.ModuleDict({"used": bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False),
                           "unused": bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)}).to("cpu")  # quantizes
    used, unused = model["used"], model["unused"]
    reference = copy.deepcopy(unused)
    x = torch.randn(4, 64, generator=gen).half()
    with torch.no_grad():
        expected = used(x)  # its first forward moves CB / SCB from the weight onto used.state
    assert used.state.CB is not None and unused.weight.CB is not None and unused.state.CB is None
    handle = soft_unload(model, pin_memory=False)
    hosts = [c.host for c in handle.chunks]
    assert _inside_any(used.weight, hosts) and _inside_any(used.state.SCB, hosts)
    assert used.state.CB.data_ptr() == used.weight.data_ptr()
    assert _inside_any(unused.weight, hosts) and _inside_any(unused.weight.SCB, hosts)
    assert unused.weight.CB.data_ptr() == unused.weight.data_ptr() and unused.state.CB is None  # unset stays unset
    restore(model)
    assert not _inside_any(used.weight, hosts) and used.state.CB.data_ptr() == used.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(used(x), expected)
        assert torch.equal(unused(x), reference(x))


def test_restore_errors():
    model = make_dit(depth=1)
    with pytest.raises(ValueError, match="not soft-unloaded"):
        restore(model)
    soft_unload(model, pin_memory=False)
    with pytest.raises(ValueError, match="restore"):
        release_pinned(model)


def test_registered_caches_are_cleared_and_failures_reported():
    cleared = []
    ok = register_cache(lambda: cleared.append(1), name="test-ok")

    def broken():
        raise RuntimeError("cache on fire")

    bad = register_cache(broken, name="test-broken")
    try:
        report = force_unload()
    finally:
        unregister_cache(ok)
        unregister_cache(bad)
    assert cleared == [1] and "test-ok" in report.caches_cleared
    assert "cache on fire" in report.cache_errors["test-broken"]


def test_exception_frames_and_sys_last_refs_are_released():
    canary = []

    def failing_run():
        activations = torch.ones(1000)  # what an OOM'd run leaves pinned in its frame
        canary.append(weakref.ref(activations))
        raise MemoryError("fake OOM")

    try:
        failing_run()
    except MemoryError as err:
        kept = err
    sys.last_value = kept
    sys.last_traceback = kept.__traceback__
    assert canary[0]() is not None  # the traceback keeps the frame's locals alive
    report = force_unload(exc=kept)
    assert canary[0]() is None
    assert "sys.last_value" in report.exception_refs_cleared and "traceback of MemoryError" in report.exception_refs_cleared
    assert getattr(sys, "last_value", None) is None


def test_comfy_host_unload_calls_model_management(monkeypatch):
    calls = []
    fake = types.ModuleType("comfy.model_management")
    fake.unload_all_models = lambda: calls.append("unload_all_models")
    fake.soft_empty_cache = lambda: calls.append("soft_empty_cache")
    package = types.ModuleType("comfy")
    package.model_management = fake
    monkeypatch.setitem(sys.modules, "comfy", package)
    monkeypatch.setitem(sys.modules, "comfy.model_management", fake)
    report = force_unload(host_unload=unload_comfy_models)
    assert report.host_unloaded == "ComfyUI models unloaded"
    assert calls == ["unload_all_models", "soft_empty_cache"]
    assert "ComfyUI models unloaded" in str(report)
    assert force_unload().host_unloaded is None  # no host hook: ComfyUI is not touched
    assert calls == ["unload_all_models", "soft_empty_cache"]


def test_orphans_are_what_keep_does_not_reach():
    kept_model = nn.Sequential(nn.Linear(4, 4))
    holder = {"cache": [torch.ones(3)]}
    lost = torch.ones(5)
    lost_module = nn.Linear(2, 2)
    candidates = [kept_model[0].weight, kept_model[0].bias, holder["cache"][0], lost, lost_module.weight]
    orphans = find_orphans(candidates, keep=[kept_model, holder], is_target=lambda t: True)
    assert [id(t) for t in orphans] == [id(lost), id(lost_module.weight)]
    count, nbytes = free_tensors(orphans)
    assert count == 2 and nbytes == 5 * 4 + 4 * 4
    assert lost.numel() == 0 and lost_module.weight.numel() == 0
    assert kept_model[0].weight.numel() == 16 and holder["cache"][0].numel() == 3


def test_report_without_cuda_is_readable():
    report = force_unload()
    text = str(report)
    assert text.startswith("Force unload:")
    if not torch.cuda.is_available():
        assert "no CUDA" in text and report.before == {} and report.as_dict()["freed_bytes"] == 0
