"""Shrinking and growing a streaming model at run time (ComfyUI's partial unload / load), on the CPU path."""

import pytest
import torch

from comfyui_headroom.memory import enable_block_streaming, module_bytes
from comfyui_headroom.memory.streaming import _middle_of_longest_run
from test_memory_models import make_dit
from test_memory_streaming import _inside, _run


def _block_bytes(model) -> int:
    return max(module_bytes(b) for b in model.blocks)


@pytest.mark.parametrize("int8", [False, True])
def test_shrink_frees_what_was_asked_and_keeps_the_output(int8, gen):
    model = make_dit(depth=8, int8=int8)
    x = torch.randn(2, 9, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=6, prefetch=1)
    _run(model, x, 1)  # the ring holds blocks now: shrink must take them back out first
    before = streamer.device_bytes()
    want = 2 * _block_bytes(model)
    freed = streamer.shrink(want)
    assert freed >= want
    assert streamer.device_bytes() == before - freed
    assert streamer.tier_counts()["gpu"] < 6 and len(streamer.demoted) == 6 - streamer.tier_counts()["gpu"]
    assert f"{len(streamer.demoted)} of them moved off the GPU to make room for another model" in streamer.summary()
    for i in streamer.demoted:  # packed into a host buffer of its own, like the planned streamed blocks
        assert any(_inside(model.blocks[i].fc1.weight, h) for h in streamer.host_buffers())
    for out in _run(model, x, 3):
        assert torch.equal(out, expected)
    assert streamer.stats.on_demand <= 1


def test_shrink_is_all_or_nothing(gen):
    model = make_dit(depth=4)
    x = torch.randn(1, 4, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=2, prefetch=1)
    before = (streamer.device_bytes(), list(streamer.streamed_indices))
    assert streamer.plan_shrink(before[0] + 1) is None
    assert streamer.shrink(before[0] + 1) == 0
    assert (streamer.device_bytes(), streamer.streamed_indices) == before and not streamer.demoted
    assert torch.equal(_run(model, x, 1)[0], expected)


def test_the_first_demotions_pay_for_the_ring(gen):
    """With no block streamed, the ring is made by the first demotions: freeing one block's bytes needs
    prefetch + 2 of them (prefetch + 1 slots of one block each, plus the block freed)."""
    model = make_dit(depth=6)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=6, prefetch=1)
    assert streamer.ring_bytes == 0
    size = streamer._block_bytes[0]
    assert len(streamer.plan_shrink(size)) == 3
    assert streamer.shrink(size) == size
    assert streamer.ring_bytes == 2 * size


def test_grow_brings_the_demoted_blocks_back_within_the_room_given(gen):
    model = make_dit(depth=8)
    x = torch.randn(2, 5, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=6, prefetch=1)
    planned = list(streamer.streamed_indices)
    full = streamer.device_bytes()
    streamer.shrink(3 * _block_bytes(model))
    demoted = list(streamer.demoted)
    assert len(demoted) == 3
    assert streamer.grow(0) == 0 and streamer.demoted == demoted  # no room: nothing moves
    added = streamer.grow(_block_bytes(model))
    assert 0 < added <= _block_bytes(model) and streamer.demoted == demoted[:-1]
    assert torch.equal(_run(model, x, 1)[0], expected)
    streamer.grow()
    assert not streamer.demoted and streamer.streamed_indices == planned and streamer.device_bytes() == full
    for out in _run(model, x, 2):
        assert torch.equal(out, expected)
    streamer.disable()
    assert torch.equal(_run(model, x, 1)[0], expected)


def test_disable_after_shrink_gives_back_an_ordinary_model(gen):
    model = make_dit(depth=5)
    x = torch.randn(1, 4, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=5, prefetch=1)
    assert streamer.shrink(_block_bytes(model)) > 0
    streamer.disable()
    assert not hasattr(model, "_headroom_streamer")
    assert torch.equal(_run(model, x, 1)[0], expected)


def test_demotions_keep_the_resident_blocks_spread():
    assert _middle_of_longest_run([True] * 8) == 4
    assert _middle_of_longest_run([True, False, True, True, True, False]) == 3
    assert _middle_of_longest_run([False, False]) is None
    model = make_dit(depth=8)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=8, prefetch=1)
    order = streamer.plan_shrink(4 * streamer._block_bytes[0])
    assert order[:3] == [4, 2, 6]  # halves first, then quarters


def _disk_tier_model(tmp_path, depth=6):
    from safetensors.torch import save_file

    model = make_dit(depth=depth)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, str(path)


def test_a_disk_tier_streamer_shrinks_to_disk_when_ram_has_no_room(tmp_path, gen):
    """With the disk tier, blocks that leave the GPU and find no room in RAM are read from the model's file on each
    pass, like the planned disk blocks (the read ring is what the host pays); grow reads them back."""
    model, path = _disk_tier_model(tmp_path)
    x = torch.randn(1, 4, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    size = _block_bytes(model)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=2, ram_budget_bytes=3 * size + 4096, disk=path)
    assert streamer.tier_counts() == {"gpu": 2, "ram": 0, "disk": 4} and streamer.resizable
    assert streamer.host_cost([0], "disk") == 0  # the ring already has its prefetch + 1 buffers
    freed = streamer.shrink(1, host_room=0)
    assert freed > 0 and streamer.tier_counts() == {"gpu": 1, "ram": 0, "disk": 5}
    demoted = streamer.demoted[0]
    weight = model.blocks[demoted].fc1.weight  # a placeholder: no copy of it anywhere but the file
    assert weight.untyped_storage().nbytes() == weight.element_size()
    for out in _run(model, x, 2):
        assert torch.equal(out, expected)
    assert streamer.grow() > 0 and streamer.tier_counts() == {"gpu": 2, "ram": 0, "disk": 4}
    assert torch.equal(_run(model, x, 1)[0], expected)


def test_ram_demotion_is_preferred_while_the_room_lasts(tmp_path, gen):
    model, path = _disk_tier_model(tmp_path, depth=4)
    size = _block_bytes(model)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=4, ram_budget_bytes=size, disk=path)
    assert streamer.disk_reader is None  # nothing streams yet
    streamer.shrink(1, host_room=10 * size)
    assert streamer.tier_counts()["disk"] == 0 and streamer.tier_counts()["ram"] > 0
    streamer.grow()
    demotions = len(streamer.plan_shrink(1))  # all four: the ring's three slots come first
    ring = streamer.host_cost(streamer.plan_shrink(1), "disk")
    assert ring == 3 * size < streamer.host_cost(streamer.plan_shrink(1), "ram") == demotions * size
    streamer.shrink(1, host_room=ring)  # no room for the copies in RAM: a disk reader starts for the demoted blocks
    assert streamer.tier_counts()["ram"] == 0 and streamer.tier_counts()["disk"] == demotions
    assert streamer.disk_reader is not None
    streamer.grow()
    assert streamer.disk_reader is None and streamer.tier_counts()["gpu"] == 4


def test_a_block_the_file_does_not_hold_as_it_is_cannot_go_to_disk(tmp_path, gen, caplog):
    model, path = _disk_tier_model(tmp_path, depth=4)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=4, ram_budget_bytes=1 << 30, disk=path)
    with torch.no_grad():
        for block in model.blocks:
            block.fc1.weight.data = block.fc1.weight.data.to(torch.float64)  # changed on load: not as stored
    room = streamer.host_cost(streamer.plan_shrink(1), "disk")  # the read ring fits, the RAM copies do not
    assert streamer.shrink(1, host_room=room) == 0 and not streamer.demoted and streamer.disk_reader is None
    assert "the model is unloaded instead" in caplog.text and "float64" in caplog.text


def test_shrink_keeps_the_host_copies_within_the_room_given(gen):
    model = make_dit(depth=6)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=6, prefetch=1)
    size = streamer._block_bytes[0]
    assert streamer.shrink(size, host_room=3 * size - 1) == 0 and not streamer.demoted  # needs three blocks
    assert streamer.host_cost([0, 1, 2], "ram") == 3 * size
    assert streamer.shrink(size, host_room=3 * size) == size and len(streamer.demoted) == 3


def test_a_shrink_that_cannot_pin_its_buffers_changes_nothing(gen, monkeypatch, caplog):
    import comfyui_headroom.memory.streaming as streaming

    model = make_dit(depth=6)
    x = torch.randn(1, 4, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=6, prefetch=1)
    real, calls = streaming.empty_host, []

    def second_fails(nbytes, pin):
        calls.append(nbytes)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real(nbytes, pin)

    monkeypatch.setattr(streaming, "empty_host", second_fails)
    assert streamer.shrink(streamer._block_bytes[0]) == 0
    assert len(calls) == 2 and not streamer.demoted and streamer.streamed_indices == []
    assert "the model is unloaded instead" in caplog.text
    assert torch.equal(_run(model, x, 1)[0], expected)


def test_grow_stops_at_the_first_block_the_device_has_no_room_for(gen, monkeypatch, caplog):
    model = make_dit(depth=6)
    x = torch.randn(1, 4, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=6, prefetch=1)
    streamer.shrink(2 * streamer._block_bytes[0])
    demoted = list(streamer.demoted)
    assert len(demoted) == 4
    real_to, moves = torch.Tensor.to, []
    first_block_tensors = len(streamer._streamed[demoted[-1]].host_views)

    def to(self, *args, **kwargs):
        moves.append(1)
        if len(moves) > first_block_tensors:  # the first block fits, then the device is full
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    streamer.grow()
    monkeypatch.undo()
    assert streamer.demoted == demoted[:-1] and "stay streamed" in caplog.text
    assert torch.equal(_run(model, x, 1)[0], expected)
