"""GPU tests of memory/: streaming equality (bf16, INT8, NF4) from pinned memory, soft unload, force unload after
a real OOM, and leak checks over 20 load -> run -> unload cycles. Run through the device tool."""

import gc
import sys

import pytest
import torch
from comfyui_headroom.memory import (
    enable_block_streaming,
    force_unload,
    module_bytes,
    restore,
    soft_unload,
)
from test_memory_models import make_dit
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)


def _model(int8, hidden=256, depth=6):
    return make_dit(depth=depth, hidden=hidden, int8=int8, dtype=torch.bfloat16)


def _x(hidden_in=16, tokens=64):
    return torch.randn(2, tokens, hidden_in, generator=torch.Generator().manual_seed(7)).to(CUDA, torch.bfloat16)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("resident,prefetch", [(0, 1), (2, 1), (1, 2)])
def test_streaming_on_cuda_equals_resident_and_reads_pinned_memory(int8, resident, prefetch):
    model = _model(int8).to(CUDA)
    x = _x()
    with torch.no_grad():
        expected = model(x)
    streamer = enable_block_streaming(model, CUDA, blocks_resident=resident, prefetch=prefetch)
    assert streamer.host_buffers() and all(h.is_pinned() for h in streamer.host_buffers())
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert streamer.stats.on_demand == (1 if resident == 0 else 0)
    for i in streamer.streamed_indices:  # evicted blocks point at pinned host memory, never pageable
        block = model.blocks[i]
        if streamer._streamed[i].slot is None:
            assert all(p.device.type == "cpu" and p.is_pinned() for p in block.parameters())
    streamer.disable(CUDA)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class _NF4Block(nn.Module):
    def __init__(self, bnb, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, dtype=torch.bfloat16)
        self.fc1 = bnb.nn.Linear4bit(hidden, 4 * hidden, compute_dtype=torch.bfloat16, quant_type="nf4")
        self.fc2 = bnb.nn.Linear4bit(4 * hidden, hidden, compute_dtype=torch.bfloat16, quant_type="nf4")

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def test_nf4_blocks_stream_and_soft_unload():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    blocks = nn.ModuleList(_NF4Block(bnb, 256) for _ in range(5)).to(CUDA)  # .to(cuda) quantizes to NF4
    assert type(blocks[0].fc1.weight).__name__ == "Params4bit" and blocks[0].fc1.weight.quant_state is not None
    x = torch.randn(2, 32, 256, device=CUDA, dtype=torch.bfloat16)

    def run():
        h = x
        with torch.no_grad():
            for b in blocks:
                h = b(h)
        return h

    expected = run()
    streamer = enable_block_streaming(blocks, CUDA, blocks_resident=1)
    assert all(h.is_pinned() for h in streamer.host_buffers())
    for _ in range(2):
        assert torch.equal(run(), expected)
    streamer.disable(CUDA)
    assert blocks[3].fc1.weight.quant_state.absmax.device.type == "cuda"
    assert torch.equal(run(), expected)
    handle = soft_unload(blocks)
    assert handle.pinned and blocks[0].fc1.weight.device.type == "cpu"
    assert blocks[0].fc1.weight.quant_state.absmax.is_pinned()
    restore(blocks, CUDA)
    assert torch.equal(run(), expected)


@pytest.mark.parametrize("int8", [False, True])
def test_soft_unload_frees_vram_and_restores_identically(int8):
    model = _model(int8, hidden=512).to(CUDA)
    x = _x()
    with torch.no_grad():
        expected = model(x)
    nbytes = module_bytes(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    handle = soft_unload(model)
    assert handle.pinned and all(c.host.is_pinned() for c in handle.chunks)
    assert before - torch.cuda.memory_allocated() >= 0.95 * nbytes
    restore(model, CUDA)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    print(f"\nsoft unload/restore {nbytes / 2**20:.0f} MiB: {handle}")


def test_force_unload_after_a_real_oom_returns_to_baseline():
    kept = _model(False, hidden=512).to(CUDA)  # a model the user keeps: part of the baseline
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    assert baseline > 0

    def doomed_run():
        activations = torch.empty(1024 ** 3, dtype=torch.uint8, device=CUDA)  # 1 GiB pinned by the frame
        activations.fill_(1)
        return torch.empty(1 << 50, dtype=torch.uint8, device=CUDA)  # 1 PiB: OOM

    try:
        doomed_run()
    except torch.OutOfMemoryError as err:
        failure = err
    sys.last_value, sys.last_traceback = failure, failure.__traceback__
    assert torch.cuda.memory_allocated() >= baseline + 1024 ** 3
    report = force_unload(keep=[kept], exc=failure)
    after = torch.cuda.memory_allocated()
    assert abs(after - baseline) <= 0.02 * baseline, str(report)
    assert report.freed_bytes("cuda:0") >= 1024 ** 3



NUKE_SCRIPT = r"""
import torch
from comfyui_headroom.memory import force_unload
from test_memory_models import make_dit

cuda = torch.device("cuda", 0)
kept = make_dit(depth=4, hidden=512, dtype=torch.bfloat16).to(cuda)
x = torch.randn(1, 16, 16, device=cuda, dtype=torch.bfloat16)
with torch.no_grad():
    expected = kept(x)
torch.cuda.synchronize()
baseline = torch.cuda.memory_allocated()
hidden_cache = [make_dit(depth=4, hidden=512, int8=True, dtype=torch.bfloat16).to(cuda)]  # forgotten by its owner
assert torch.cuda.memory_allocated() > baseline
report = force_unload(keep=[kept, x, expected], nuke_orphaned_tensors=True)
after = torch.cuda.memory_allocated()
assert abs(after - baseline) <= 0.02 * baseline, (after, baseline, str(report))
assert report.orphans_freed > 0 and report.orphan_modules > 0, str(report)
assert hidden_cache[0].blocks[0].fc1.weight.numel() == 0
with torch.no_grad():
    assert torch.equal(kept(x), expected)
print("NUKE-OK", report)
"""


def test_nuke_orphaned_tensors_frees_what_keep_does_not_reach():
    # In a subprocess: the nuke destroys every CUDA tensor of the process that `keep` does not reach.
    import os
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", NUKE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "NUKE-OK" in proc.stdout, proc.stdout + proc.stderr


def test_twenty_streaming_cycles_do_not_leak():
    x = _x()
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    readings, peak = [], 0
    for _ in range(20):
        model = _model(True, hidden=512)  # load (CPU) -> stream onto the GPU -> run -> unload
        streamer = enable_block_streaming(model, CUDA, blocks_resident=2)
        with torch.no_grad():
            model(x)
        peak = max(peak, torch.cuda.memory_allocated())
        streamer.disable()
        del model, streamer
        force_unload(gc_passes=1)
        readings.append(torch.cuda.memory_allocated())
    # cycle 1 may leave lasting allocations (kernel workspaces); after that nothing may accumulate
    assert readings[-1] - readings[0] <= 0.01 * (peak - start), readings
    assert readings[0] - start <= 0.05 * (peak - start), readings


def test_twenty_soft_unload_cycles_do_not_leak():
    model = _model(True, hidden=512).to(CUDA)
    x = _x()
    with torch.no_grad():
        expected = model(x)
    soft_unload(model)
    gc.collect()
    base = torch.cuda.memory_allocated()
    nbytes = module_bytes(model)
    for _ in range(20):
        restore(model, CUDA)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
        handle = soft_unload(model)
        assert handle.reused
        assert torch.cuda.memory_allocated() - base <= 0.01 * nbytes


def test_tracker_measures_vram_peaks():
    from comfyui_headroom.memory import MemoryTracker

    with MemoryTracker() as tracker:
        block = torch.empty(256 * 1024 ** 2, dtype=torch.uint8, device=CUDA)
        block.fill_(3)
        del block
    report = tracker.report
    peak = report.devices["cuda:0"]
    assert peak.peak_allocated_bytes - peak.start_allocated_bytes >= 256 * 1024 ** 2
    assert peak.peak_reserved_bytes >= peak.peak_allocated_bytes
    assert str(report).startswith("Peak VRAM ") and "n/a" not in str(report)
    print("\n" + str(report))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("resident,prefetch", [(6, 1), (3, 2), (1, 2)])
def test_cuda_graphs_give_the_eager_results_resident_and_streamed(int8, resident, prefetch):
    """memory/graphs.py: blocks replayed from CUDA graphs (resident, or streamed with a rotating ring: 5 streamed
    blocks over 3 slots) give the eager outputs bit for bit; graphs are really replayed; a call with keyword
    arguments runs eagerly; disable() puts the blocks' own forward back."""
    model = _model(int8).to(CUDA)
    x = _x()
    with torch.no_grad():
        expected = model(x)
    if resident == 6:
        from comfyui_headroom.memory import graph_blocks

        graphs, streamer = graph_blocks(list(model.blocks)), None
    else:
        streamer = enable_block_streaming(model, CUDA, blocks_resident=resident, prefetch=prefetch, cuda_graphs=True)
        graphs = streamer.graphs
    with torch.no_grad():
        for _ in range(2 + 2 * (prefetch + 1) + 2):  # warm-up and capture of every (block, slot), then replays
            assert torch.equal(model(x), expected)
        assert graphs.graph_count >= len(model.blocks) and graphs.replays > 0
        before = graphs.replays
        index = next(i for i in range(len(model.blocks)) if streamer is None or i not in streamer.streamed_indices)
        block = model.blocks[index]
        h = model.patch_embed(x)
        for earlier in model.blocks[:index]:
            h = earlier(h)
        assert torch.equal(block(h), block(h))  # a resident block, positional input: replayed
        assert graphs.replays == before + index + 2
        assert torch.equal(block(x=h), block(h)) and graphs.replays == before + index + 3  # keyword: eager
    if streamer is not None:
        streamer.disable(CUDA)
    else:
        graphs.remove()
    assert all("forward" not in b.__dict__ for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_cuda_graph_capture_failure_falls_back_to_eager():
    """A block that synchronises with the host cannot be captured: it keeps running eagerly, with its results."""
    from comfyui_headroom.memory import graph_blocks

    class Syncing(nn.Module):
        def forward(self, x):
            return x * float(x.abs().max())  # .item()-style host read: not capturable

    block = Syncing()
    graphs = graph_blocks([block])
    x = torch.randn(8, 8, device=CUDA)
    with torch.no_grad():
        outs = [block(x) for _ in range(4)]
    assert all(torch.equal(o, x * float(x.abs().max())) for o in outs)
    assert graphs.graph_count == 0 and graphs.replays == 0
    graphs.remove()
