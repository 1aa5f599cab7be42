"""The disk tier: three-tier plans, blocks read from their safetensors file bit for bit, errors for changed files,
the page cache left alone, and peak RSS under a RAM budget well below the model (in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from comfyui_headroom.memory import PlanError, enable_block_streaming, module_bytes, plan_placement
from comfyui_headroom.memory.disk import DiskTierError, SafetensorsSource, file_pages_cached
from comfyui_headroom.memory.planner import default_ram_budget_bytes
from test_memory_models import make_dit


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with open(path, "rb+") as f:  # on disk and out of the page cache: the reads below start cold
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def _run(model, x, passes=3):
    with torch.no_grad():
        return [model(x) for _ in range(passes)]


@pytest.fixture()
def dit():
    return make_dit(depth=8)


def test_ram_budget_splits_streamed_blocks_between_ram_and_disk(dit):
    block = module_bytes(dit.blocks[0])
    plan = plan_placement(dit, 10 ** 9, blocks_resident=2, prefetch=1, ram_budget_bytes=2 * block + 2 * block)
    streamed = plan.streamed_blocks()
    assert len(streamed) == 6
    assert sorted(plan.pinned_blocks() + plan.disk_blocks()) == sorted(streamed)  # each streamed block: one tier
    assert len(plan.pinned_blocks()) == 2 and len(plan.disk_blocks()) == 4  # 2 in RAM + a ring of 2 buffers
    assert plan.disk_slots == 2 and plan.disk_ring_bytes == 2 * block
    assert plan.ram_bytes == 4 * block <= plan.ram_budget_bytes
    assert plan.tier_counts() == {"gpu": 2, "ram": 2, "disk": 4}
    assert {plan.device_of(n) for n in plan.disk_blocks()} == {"disk"}
    assert {plan.device_of(n) for n in plan.pinned_blocks()} == {"pinned"}
    assert plan.disk_bytes == 4 * block and plan.pinned_bytes == 2 * block
    d = json.loads(json.dumps(plan.as_dict()))
    assert d["tiers"] == {"gpu": 2, "ram": 2, "disk": 4} and d["disk_bytes"] == 4 * block
    assert "streamed from disk" in str(plan)
    # RAM and disk blocks alternate among the streamed ones, so every read overlaps other blocks' work
    positions = [streamed.index(n) for n in plan.pinned_blocks()]
    assert positions == [0, 3]


def test_enough_ram_means_nothing_on_disk_and_too_little_is_an_error(dit):
    block = module_bytes(dit.blocks[0])
    plan = plan_placement(dit, 10 ** 9, blocks_resident=2, ram_budget_bytes=6 * block)
    assert plan.disk == [] and plan.tier_counts() == {"gpu": 2, "ram": 6, "disk": 0}
    assert plan_placement(dit, 10 ** 9, blocks_resident=2).ram_budget_bytes is None  # no RAM tier asked
    with pytest.raises(PlanError, match="RAM budget .* below the disk read ring of 3 buffers"):
        plan_placement(dit, 10 ** 9, blocks_resident=2, ram_budget_bytes=3 * block - 1)
    with pytest.raises(PlanError, match="ram_budget_bytes"):
        plan_placement(dit, 10 ** 9, ram_budget_bytes=-1)


def test_default_ram_budget_leaves_room_for_the_os():
    gb = 2 ** 30
    assert default_ram_budget_bytes(60 * gb, 64 * gb) == 60 * gb - 6 * gb - int(6.4 * gb)
    assert default_ram_budget_bytes(gb, 64 * gb) == 0
    assert 0 <= default_ram_budget_bytes() < 10 ** 15  # psutil's numbers


@pytest.mark.parametrize("int8", [False, True])
def test_blocks_streamed_from_disk_equal_resident_bit_for_bit(tmp_path, gen, int8):
    model = make_dit(depth=8, int8=int8)
    path = _save(model, tmp_path / "model.safetensors")
    x = torch.randn(2, 9, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    block = module_bytes(model.blocks[0])
    streamer = enable_block_streaming(model, "cpu", blocks_resident=2, prefetch=1,
                                      ram_budget_bytes=2 * block + 2 * block, disk=path)
    assert streamer.tier_counts() == {"gpu": 2, "ram": 2, "disk": 4}
    assert len(streamer.host_buffers()) == 2  # disk blocks own no host buffer
    for out in _run(model, x):
        assert torch.equal(out, expected)
    stats = streamer.disk_reader.stats
    assert stats.reads >= 3 * 4 and stats.bytes_read >= 3 * 4 * block * 0.9
    assert "4 on disk" in streamer.summary()
    # out of order: the read-ahead restarts where the caller is
    hidden = torch.randn(2, 9, 64, generator=gen)

    def backwards():
        with torch.no_grad():
            h = hidden
            for b in reversed(model.blocks):
                h = b(h)
        return h

    streamed_backwards = backwards()
    assert stats.discarded > 0
    streamer.disable()
    assert torch.equal(streamed_backwards, backwards())
    assert torch.equal(_run(model, x, 1)[0], expected)  # disabled: disk blocks were read back into RAM


def test_a_never_loaded_model_streams_from_its_file(tmp_path, gen):
    """Disk blocks may stay on the meta device: their bytes never enter RAM except through the ring."""
    model = make_dit(depth=6)
    path = _save(model, tmp_path / "model.safetensors")
    x = torch.randn(1, 5, 16, generator=gen)
    expected = _run(model, x, 1)[0]
    empty = make_dit(depth=6)
    block = module_bytes(empty.blocks[0])
    plan = plan_placement(empty, 10 ** 9, blocks_resident=1, prefetch=1, ram_budget_bytes=2 * block)
    for name in plan.disk_blocks():
        empty.get_submodule(name).to("meta")
    streamer = enable_block_streaming(empty, "cpu", plan=plan, prefetch=1, disk=SafetensorsSource(path))
    assert streamer.tier_counts()["disk"] == 5
    for out in _run(empty, x, 2):
        assert torch.equal(out, expected)
    streamer.disable()


def test_a_changed_or_truncated_file_is_a_clear_error(tmp_path, gen):
    model = make_dit(depth=4)
    path = _save(model, tmp_path / "model.safetensors")
    x = torch.randn(1, 5, 16, generator=gen)
    block = module_bytes(model.blocks[0])
    streamer = enable_block_streaming(model, "cpu", blocks_resident=1, prefetch=1, ram_budget_bytes=2 * block,
                                      disk=path)
    _run(model, x, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated under the running model
    # the check before a read says "is shorter"; a read the reader thread had begun says where it "stopped"
    with pytest.raises(DiskTierError, match=r"model\.safetensors(:| is shorter).*block blocks\.\d.*reload the model"):
        _run(model, x, 2)
    path.write_bytes(data[:-4] + b"abcd")  # same size, other bytes: mtime differs
    os.utime(path, ns=(1, 1))
    with pytest.raises(DiskTierError, match="changed since|is shorter|stopped at byte"):  # mid-rewrite: any of them
        _run(model, x, 2)
    streamer.disk_reader.close()


def test_a_block_the_file_does_not_hold_as_is_is_refused_before_anything_moves(tmp_path):
    model = make_dit(depth=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing = dict(state)
    missing.pop("blocks.3.fc1.weight")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    other = dict(state, **{"blocks.3.fc1.weight": state["blocks.3.fc1.weight"].half()})
    save_file(other, str(tmp_path / "half.safetensors"))
    block = module_bytes(model.blocks[0])
    kwargs = dict(blocks_resident=1, prefetch=1, ram_budget_bytes=2 * block)
    with pytest.raises(DiskTierError, match=r"block blocks\.3: tensor 'blocks\.3\.fc1\.weight' is not in .*missing"):
        enable_block_streaming(model, "cpu", disk=tmp_path / "missing.safetensors", **kwargs)
    with pytest.raises(DiskTierError, match=r"torch.float16 .* but torch.float32 .*headroom convert"):
        enable_block_streaming(model, "cpu", disk=tmp_path / "half.safetensors", **kwargs)
    with pytest.raises(ValueError, match="no disk source"):
        enable_block_streaming(model, "cpu", **kwargs)
    assert model.blocks[3].fc1.weight.stride() != (0, 0)  # nothing was parked


def test_streaming_from_disk_does_not_fill_the_page_cache(tmp_path, gen):
    model = make_dit(depth=8, hidden=256)
    path = _save(model, tmp_path / "model.safetensors")
    size = path.stat().st_size
    if file_pages_cached(path) is None or file_pages_cached(path) > size // 2:
        pytest.skip("this filesystem keeps the file in memory (tmpfs) or cannot report cached pages")
    block = module_bytes(model.blocks[0])
    streamer = enable_block_streaming(model, "cpu", blocks_resident=0, prefetch=1, ram_budget_bytes=2 * block,
                                      disk=path)
    assert streamer.tier_counts()["disk"] == 8
    _run(model, torch.randn(1, 5, 16, generator=gen), 3)
    cached = file_pages_cached(path)
    assert streamer.disk_reader.stats.bytes_read >= 3 * 8 * block * 0.9
    assert cached <= size // 4, f"{cached} of {size} bytes of the file are in the page cache"
    streamer.disable()


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import psutil, torch
    from torch import nn
    from comfyui_headroom.memory import enable_block_streaming, plan_placement
    MB = 2 ** 20
    path, ram_mb = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    proc = psutil.Process()
    def blocks():
        return nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 1024),
                                             nn.Linear(1024, 1024)) for _ in range(20)])
    with torch.device("meta"):
        model = blocks()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    plan = plan_placement(list(model), 0, blocks_resident=0, prefetch=1, ram_budget_bytes=ram_mb * MB,
                          devices=["cpu"])
    streamer = enable_block_streaming(list(model), "cpu", plan=plan, prefetch=1, disk=path)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        again = model(x)
    done.set()
    time.sleep(0.01)
    torch.save({"out": out}, sys.argv[3])
    print(json.dumps({"base": base, "peak": peak[0], "tiers": streamer.tier_counts(), "equal": bool(torch.equal(out, again)),
                      "read": streamer.disk_reader.stats.bytes_read, "host": streamer.host_bytes}))
""")


def test_peak_rss_stays_under_the_ram_budget_for_a_model_three_times_larger(tmp_path):
    """A 320 MB model, 100 MB of RAM for blocks: streamed from disk in a subprocess, peak RSS measured (psutil);
    the output is the resident model's, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
                                  for _ in range(20)])
    names = {f"{i}.{k}": v for i, blk in enumerate(model) for k, v in blk.state_dict().items()}
    path = _save_dict(names, tmp_path / "big.safetensors")
    model_bytes = module_bytes(model)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    del model, names
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), "100", str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["tiers"]["disk"] >= 16 and r["equal"]
    assert r["read"] >= 2 * r["tiers"]["disk"] * 16 * 2 ** 20
    grown = r["peak"] - r["base"]
    # the RAM budget + the (CPU) "GPU" ring of 2 blocks + activations and allocator slack; the model is 320 MB
    assert r["host"] <= 100 * 2 ** 20
    assert grown <= 100 * 2 ** 20 + 2 * 16 * 2 ** 20 + 64 * 2 ** 20, r
    assert grown < model_bytes / 2, r
    assert torch.equal(torch.load(tmp_path / "out.pt")["out"], expected)


def _save_dict(tensors, path):
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path
