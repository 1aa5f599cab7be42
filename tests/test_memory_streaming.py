"""Block streaming on the CPU path: same outputs as the plain model, real re-pointing, hooks, removal."""

import pytest
import torch

from comfyui_headroom.memory import disable_block_streaming, enable_block_streaming, module_bytes
from comfyui_headroom.memory.planner import spread_positions
from comfyui_headroom.memory.tensors import UnsupportedModuleError, collect_tensor_refs
from test_memory_models import TinyCausalLM, TinyFlux, make_dit


def _inside(tensor, buffer):
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel()


def _run(model, x, passes=3):
    with torch.no_grad():
        return [model(x) for _ in range(passes)]


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("resident,prefetch", [(0, 1), (2, 1), (3, 2), (0, 3), (6, 1)])
def test_streamed_outputs_equal_plain_outputs(int8, resident, prefetch, gen):
    model = make_dit(depth=6, int8=int8)
    x = torch.randn(2, 9, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=resident, prefetch=prefetch)
    outs = _run(model, x)
    for out in outs:
        assert torch.equal(out, expected)
    n_streamed = 6 - resident
    kept = spread_positions(6, resident)  # resident blocks spread evenly (order="spread")
    assert streamer.streamed_indices == [i for i in range(6) if i not in kept]
    if n_streamed:
        assert streamer.stats.copies >= n_streamed
        # Prefetch covers every streamed block, except the very first one when no resident block ran before it.
        assert streamer.stats.on_demand == (1 if resident == 0 else 0)
    else:
        assert streamer.stats.copies == 0


def test_params_really_move_between_host_buffer_and_ring(gen):
    model = make_dit(depth=5)
    x = torch.randn(1, 4, 16, generator=gen)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=1)
    seen = {}

    def spy(index):
        def hook(module, args, output):
            seen[index] = [any(_inside(module.fc1.weight, s.buffer) for s in streamer._slots),
                           any(_inside(module.fc1.weight, h) for h in streamer.host_buffers())]
        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(spy(i))
    _run(model, x, 1)
    assert seen[0] == [False, False]  # resident
    for i in range(1, 5):
        assert seen[i] == [True, False]  # computed from a ring slot
    # between steps the streamed blocks that were evicted point back at their host copy
    evicted = [i for i in range(1, 5) if streamer._streamed[i].slot is None]
    assert evicted
    for i in evicted:
        assert any(_inside(model.blocks[i].fc1.weight, h) for h in streamer.host_buffers())
    assert streamer.ring_bytes == 2 * max(module_bytes(model.blocks[i]) for i in range(1, 5)) or \
        streamer.ring_bytes >= 2 * module_bytes(model.blocks[1])


def test_out_of_order_calls_stay_correct(gen):
    model = make_dit(depth=5)
    x = torch.randn(1, 4, 64, generator=gen)
    with torch.no_grad():
        expected = x
        for block in reversed(model.blocks):
            expected = block(expected)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=0)
    with torch.no_grad():
        for _ in range(2):
            h = x
            for block in reversed(model.blocks):
                h = block(h)
            assert torch.equal(h, expected)
    assert streamer.stats.on_demand > 0


def test_disable_restores_a_normal_model(gen):
    model = make_dit(depth=4, int8=True)
    x = torch.randn(2, 5, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    hooks_before = [len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.blocks]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=1)
    with pytest.raises(RuntimeError, match="already streaming"):
        enable_block_streaming(model, "cpu", blocks_resident=1)
    disable_block_streaming(model)
    assert [len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.blocks] == hooks_before
    assert not hasattr(model, "_headroom_streamer")
    assert torch.equal(_run(model, x, 1)[0], expected)
    streamer.disable()  # idempotent
    again = enable_block_streaming(model, "cpu", blocks_resident=2)
    assert torch.equal(_run(model, x, 1)[0], expected)
    again.disable(device="cpu")
    with pytest.raises(ValueError, match="not streaming"):
        disable_block_streaming(model)


def test_user_hooks_still_fire_and_a_block_list_works(gen):
    model = make_dit(depth=4)
    x = torch.randn(1, 3, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    calls = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    streamer = enable_block_streaming(model.blocks, "cpu", blocks_resident=1)  # just the list
    assert torch.equal(_run(model, x, 1)[0], expected)
    assert calls == ["pre"]
    streamer.disable()


def test_transformers_style_model_by_path(gen):
    lm = TinyCausalLM(depth=4).eval()
    ids = torch.randint(0, 97, (2, 7), generator=gen)
    expected = _run(lm, ids, 1)[0]
    streamer = enable_block_streaming(lm, "cpu", blocks="model.layers", blocks_resident=1)
    assert streamer.names == [f"model.layers.{i}" for i in range(4)]
    for out in _run(lm, ids, 2):
        assert torch.equal(out, expected)


def test_real_transformers_llama(gen):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (1, 12), generator=gen)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    streamer = enable_block_streaming(model, "cpu", blocks="model.layers", blocks_resident=1)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids, use_cache=False).logits, expected)
    assert streamer.stats.copies >= 3


def test_flux_two_lists_auto_detected(gen):
    torch.manual_seed(0)
    model = TinyFlux(2, 3).eval()
    x = torch.randn(1, 4, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    streamer = enable_block_streaming(model, "cpu", blocks_resident=2)
    assert streamer.names[:2] == ["double_blocks.0", "double_blocks.1"]
    assert streamer.streamed_indices == [1, 3, 4]  # resident: positions 0 and 2 (spread)
    assert torch.equal(_run(model, x, 1)[0], expected)


def test_budget_decides_the_resident_blocks(gen):
    model = make_dit(depth=8)
    block = module_bytes(model.blocks[0])
    rest = module_bytes(model) - 8 * block
    streamer = enable_block_streaming(model, "cpu", budget_bytes=rest + 3 * block + 3 * block)  # ring 3 + 3 blocks
    assert streamer.streamed_indices == [1, 3, 4, 6, 7]  # resident 0, 2, 5: spread
    streamer.disable()
    first = enable_block_streaming(model, "cpu", budget_bytes=rest + 2 * block + 3 * block, prefetch=1, order="first")
    assert first.streamed_indices == [3, 4, 5, 6, 7]


def test_pinning_needs_cuda_and_bnb_int8_is_refused():
    model = make_dit(depth=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            enable_block_streaming(model, "cpu", blocks_resident=0, pin_memory=True)
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    with pytest.raises(UnsupportedModuleError, match="Linear8bitLt"):
        collect_tensor_refs(torch.nn.Sequential(layer))


def test_a_plan_for_other_blocks_and_soft_unload_while_streaming_are_refused():
    from comfyui_headroom.memory import plan_placement, soft_unload

    model = make_dit(depth=4)
    other = plan_placement(list(model.blocks), 10 ** 9, blocks_resident=1)  # names "0".."3", not "blocks.N"
    with pytest.raises(ValueError, match="plan was made for blocks"):
        enable_block_streaming(model, "cpu", plan=other)
    plan = plan_placement(model, 10 ** 9, blocks_resident=1, devices=["cpu"])
    streamer = enable_block_streaming(model, "cpu", plan=plan)
    assert streamer.streamed_indices == [1, 2, 3]
    with pytest.raises(ValueError, match="disable_block_streaming"):
        soft_unload(model, pin_memory=False)
    streamer.disable()


def test_cuda_graphs_are_ignored_off_cuda(gen, caplog):
    """cuda_graphs=True needs CUDA; streaming onto the CPU warns and streams as usual (GPU: test_memory_gpu.py)."""
    model = make_dit(depth=4)
    x = torch.randn(2, 5, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    with caplog.at_level("WARNING", logger="comfyui_headroom"):
        streamer = enable_block_streaming(model, "cpu", blocks_resident=1, cuda_graphs=True)
    assert streamer.graphs is None and "cuda_graphs=True ignored" in caplog.text
    assert all(torch.equal(out, expected) for out in _run(model, x))
    streamer.disable()


def test_slot_of_names_where_each_block_is(gen):
    model = make_dit(depth=4)
    streamer = enable_block_streaming(model, "cpu", blocks_resident=2, prefetch=1, order="first")
    _run(model, torch.randn(2, 5, 16, generator=gen), 1)
    assert streamer.slot_of(0) is None and streamer.slot_of(1) is None  # resident
    slots = [streamer.slot_of(i) for i in streamer.streamed_indices]
    assert all(s in (0, 1) for s in slots)
    streamer.disable()
