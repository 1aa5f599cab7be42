"""HunyuanImage-3's disk tier on our INT8 engine (ram_budget_gb, issue #19) on the CPU road: decoder layers beyond the
RAM budget stay on meta and stream from the files - as stored from a headroom convert folder, else from an INT8 cache
written once - with the same image as a resident load, bit for bit. GPU checks: test_hunyuan3_gpu.py."""

import os
import re
import time

import numpy as np
import pytest
import torch

from comfyui_headroom.integrations.hunyuan3 import disk_tier
from comfyui_headroom.integrations.hunyuan3.generate import GenerateRequest, GenerationOOM, generate, soft_unload_model
from comfyui_headroom.integrations.hunyuan3.loader import LoaderError, load_hf_model
from comfyui_headroom.memory import module_bytes
from comfyui_headroom.memory.disk import DiskTierError, SafetensorsSource, plan_block_read, read_block_once
from comfyui_headroom.memory.tensors import FlatLayout, collect_tensor_refs
from hunyuan3_fake import build_fake_folder

GB = 1024 ** 3
LAYERS = 6
CPU_ROAD = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU road; tests/test_hunyuan3_gpu.py covers CUDA")


def _request(**kw):
    base = dict(prompt="a red fox", seed=3, steps=2, guidance=2.0, width=64, height=64, offload_mode="smart")
    base.update(kw)
    return GenerateRequest(**base)


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory):
    return build_fake_folder(tmp_path_factory.mktemp("hy3disk") / "HunyuanImage-3-fake", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def resident(fake_folder):
    """The resident load and its image: what every disk-tier load must reproduce."""
    loaded = load_hf_model(fake_folder, "int8", trust_remote_code=True)
    image = np.asarray(generate(loaded, _request()).image)
    layer = module_bytes(loaded.model.model.layers[0])
    return loaded, image, layer


def _disk_load(folder, layer_bytes, **kw):
    # 1 layer resident, 5 streamed: a RAM budget of ~4 layers keeps 1 in RAM next to a read ring of 3 -> 4 on disk
    return load_hf_model(folder, "int8", trust_remote_code=True, device_map="manual", gpu_layers=1,
                         ram_budget_gb=4.2 * layer_bytes / GB, **kw)


def _cache_files(folder):
    root = disk_tier.cache_folder(folder)
    return {p.name: p.stat().st_mtime_ns for p in root.glob("*.safetensors")}


@CPU_ROAD
def test_disk_layers_from_the_cache_give_the_resident_image_bit_for_bit(fake_folder, resident):
    disk_tier.remove_cache(fake_folder)
    _, want, layer = resident
    loaded = _disk_load(fake_folder, layer)
    assert loaded.streamer.tier_counts() == {"gpu": 1, "ram": 1, "disk": 4}
    assert loaded.tier_plan.tier_counts() == {"gpu": 1, "ram": 1, "disk": 4}
    disk_layers = [loaded.model.model.layers[i] for i in loaded.streamer.disk_indices]
    assert all(p.stride() == () or 0 in p.stride() for m in disk_layers for p in m.parameters())  # no data held
    root = disk_tier.cache_folder(fake_folder)
    assert root.name == f"{fake_folder.name}{disk_tier.CACHE_SUFFIX}" and root.parent == fake_folder.parent
    assert sorted(_cache_files(fake_folder)) == [f"layer-{i:05d}.safetensors" for i in loaded.streamer.disk_indices]
    assert (root / disk_tier.MANIFEST).is_file()
    summary = loaded.summary()
    assert "wrote the INT8 cache of 4 decoder layers" in summary and str(root) in summary
    assert "decoder layers: 1 resident on cpu, 1 in RAM, 4 on disk" in summary
    result = generate(loaded, _request())
    assert np.array_equal(want, np.asarray(result.image))
    assert re.search(r"4 on disk .*disk read [\d.]+ GB in \d+ layer reads at [\d.]+ GB/s", result.status)
    assert loaded.streamer.disk_reader.stats.reads >= 4
    # soft unload: a streamed model keeps its placement, and says where its layers are
    text = soft_unload_model(loaded)
    assert text.startswith("soft unload skipped") and "4 on disk" in text and loaded.parked is None
    # force unload (the node cache's drop): the streamer goes first, disk layers are not read back
    from comfyui_headroom.nodes import hunyuan3_nodes as nodes

    streamer, reader, on_disk = loaded.streamer, loaded.streamer.disk_reader, loaded.streamer.disk_indices
    nodes.CACHE.put(("k",), loaded)
    assert nodes.CACHE.drop()
    assert loaded.model is None and loaded.streamer is None and not reader._thread.is_alive()
    assert all(p.device.type == "meta" for i in on_disk for p in streamer.blocks[i].parameters())


@CPU_ROAD
def test_the_cache_is_written_once_reused_and_rewritten_when_the_source_changes(fake_folder, resident):
    _, want, layer = resident
    disk_tier.remove_cache(fake_folder)
    first = _disk_load(fake_folder, layer)
    written = _cache_files(fake_folder)
    first.release()
    time.sleep(0.01)
    again = _disk_load(fake_folder, layer)
    assert _cache_files(fake_folder) == written  # nothing rewritten
    assert "stream from the INT8 cache" in again.summary() and "wrote the INT8 cache" not in again.summary()
    assert np.array_equal(want, np.asarray(generate(again, _request()).image))
    again.release()
    # a changed source (another mtime) starts the cache over
    weights = fake_folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    changed = _disk_load(fake_folder, layer)
    assert "written anew" in changed.summary() and "wrote the INT8 cache of 4" in changed.summary()
    assert all(_cache_files(fake_folder)[n] != written[n] for n in written)
    changed.release()


@CPU_ROAD
def test_a_truncated_cache_file_is_a_clear_error(fake_folder, resident):
    _, _, layer = resident
    _disk_load(fake_folder, layer).release()  # the cache exists
    root = disk_tier.cache_folder(fake_folder)
    victim = sorted(root.glob("layer-*.safetensors"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)
    with pytest.raises(LoaderError, match=rf"{re.escape(str(victim))}: the INT8 cache file .*\(truncated"):
        _disk_load(fake_folder, layer)
    disk_tier.remove_cache(fake_folder)


@CPU_ROAD
def test_a_cache_file_truncated_while_the_model_runs_stops_the_run(fake_folder, resident):
    _, _, layer = resident
    disk_tier.remove_cache(fake_folder)
    loaded = _disk_load(fake_folder, layer)
    victim = disk_tier.cache_folder(fake_folder) / f"layer-{loaded.streamer.disk_indices[-1]:05d}.safetensors"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(DiskTierError, match="reload the model"):
        generate(loaded, _request())
    loaded.release()
    disk_tier.remove_cache(fake_folder)


@CPU_ROAD
def test_oom_in_a_run_shows_the_plan_and_what_to_change(fake_folder, resident, monkeypatch):
    _, _, layer = resident
    loaded = _disk_load(fake_folder, layer)

    def boom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loaded.model, "generate_image", boom)
    with pytest.raises(GenerationOOM) as info:
        generate(loaded, _request())
    text = str(info.value)
    assert "the plan of the decoder layers in use" in text and "streamed from disk onto cpu: 4 blocks" in text
    assert "what to change" in text and "RAM budget" in text
    loaded.release()


@CPU_ROAD
def test_a_headroom_convert_folder_streams_its_int8_layers_as_stored(tmp_path):
    from comfyui_headroom.quant.convert import convert_folder

    # every Linear the engine quantizes is >= 1024 wide, so the converter quantizes it too: nothing differs
    src = build_fake_folder(tmp_path / "wide", hidden_size=1024, num_attention_heads=8, attention_head_dim=128,
                            moe_intermediate_size=1024, num_experts=2, moe_topk=1, num_hidden_layers=LAYERS,
                            vit_aligner={"input_dim": 64, "n_embed": 1024})
    out = tmp_path / "converted"
    convert_folder(src, out, progress=False)
    base = load_hf_model(out, "int8", trust_remote_code=True)
    want = np.asarray(base.model.generate_image("a red fox", seed=1))
    layer = module_bytes(base.model.model.layers[0])
    del base
    loaded = _disk_load(out, layer)
    assert loaded.streamer.tier_counts()["disk"] == 4
    assert "stream from" in loaded.summary() and "as stored (INT8, no cache)" in loaded.summary()
    assert not disk_tier.cache_folder(out).exists()
    assert np.array_equal(want, np.asarray(loaded.model.generate_image("a red fox", seed=1)))
    loaded.release()


def test_stacked_experts_read_from_per_expert_tensors(tmp_path):
    """memory/disk: SafetensorsSource(stacked=...) fills an [E, out, in] tensor from E file tensors as stored."""
    from safetensors.torch import save_file

    from comfyui_headroom.integrations.hunyuan3.moe import StackedExperts
    from comfyui_headroom.quant.grouped import Int8GroupedLinear

    torch.manual_seed(0)
    experts = StackedExperts(Int8GroupedLinear(3, 16, 8), Int8GroupedLinear(3, 8, 16))
    tensors = {}
    for proj in ("gate_and_up_proj", "down_proj"):
        stack = getattr(experts, proj)
        stack.weight.copy_(torch.randint(-127, 128, stack.weight.shape, dtype=torch.int8))
        stack.weight_scale.copy_(torch.rand(stack.weight_scale.shape))
        for e in range(3):  # per expert, interleaved, scales as [out, 1] (ComfyUI style): the bytes are the same
            tensors[f"layers.0.experts.{e}.{proj}.weight"] = stack.weight[e].clone()
            tensors[f"layers.0.experts.{e}.{proj}.weight_scale"] = stack.weight_scale[e].clone().reshape(-1, 1)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    layout = FlatLayout(collect_tensor_refs(experts))
    read = plan_block_read("layers.0.experts", layout, SafetensorsSource(tmp_path / "m.safetensors",
                                                                          stacked=disk_tier.expert_parts))
    flat = torch.empty(layout.nbytes, dtype=torch.uint8)
    read_block_once(read, flat)
    for view, ref in zip(layout.views(flat), layout.refs):
        assert torch.equal(view, ref.get()), ref.name
    with pytest.raises(DiskTierError, match="is not in"):  # without the rule the stacked names are not in the file
        plan_block_read("layers.0.experts", layout, SafetensorsSource(tmp_path / "m.safetensors"))
    tensors["layers.0.experts.1.down_proj.weight"] = tensors["layers.0.experts.1.down_proj.weight"].float()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(DiskTierError, match=r"experts.1.down_proj.weight' is torch.float32"):
        plan_block_read("layers.0.experts", layout, SafetensorsSource(tmp_path / "m.safetensors",
                                                                      stacked=disk_tier.expert_parts))


def test_ram_budget_is_checked_and_needs_the_headroom_engine(fake_folder):
    with pytest.raises(LoaderError, match="ram_budget_gb=-1"):
        load_hf_model(fake_folder, "int8", trust_remote_code=True, ram_budget_gb=-1)
    with pytest.raises(LoaderError, match="needs the headroom INT8 engine"):
        load_hf_model(fake_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True, ram_budget_gb=1.0)
    with pytest.raises(LoaderError, match="needs the headroom INT8 engine"):
        load_hf_model(fake_folder, "bf16", trust_remote_code=True, ram_budget_gb=1.0)


def test_the_cache_goes_under_headroom_cache_when_the_model_folder_is_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "ro" / "model"
    folder.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(disk_tier.os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro"))
                        else real_access(p, mode))
    monkeypatch.delenv(disk_tier.CACHE_ENV, raising=False)
    with pytest.raises(LoaderError, match="HEADROOM_CACHE"):
        disk_tier.cache_folder(folder)
    monkeypatch.setenv(disk_tier.CACHE_ENV, str(tmp_path / "cache"))
    root = disk_tier.cache_folder(folder)
    assert root.parent == tmp_path / "cache" and root.name.startswith("model-")
    assert root.name.endswith(disk_tier.CACHE_SUFFIX)
    # writable: next to the model
    monkeypatch.setattr(disk_tier.os, "access", real_access)
    assert disk_tier.cache_folder(folder) == folder.parent / f"model{disk_tier.CACHE_SUFFIX}"
