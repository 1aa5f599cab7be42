"""HunyuanImage-3 road on the CPU: the tiny fake model through from_pretrained(trust_remote_code) + bitsandbytes.

One fake folder per module; INT8 / NF4 loads are shared. GPU checks are in test_hunyuan3_gpu.py.
"""

import json
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from comfyui_headroom.integrations.hunyuan3 import loader as hf_loader  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.bnb import HUNYUAN3_SKIP_PATTERNS  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.generate import GenerateRequest, GenerationOOM, generate  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.loader import LoaderError, load_hf_model, save_quantized  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.placement import (  # noqa: E402
    DeviceMapError,
    manual_device_map,
    max_memory_for_budget,
    plan_quantized_map,
    validate_device_map,
)
from comfyui_headroom.quant.bnb_layers import is_bnb_quantized  # noqa: E402
from hunyuan3_fake import build_fake_folder  # noqa: E402

STATUS_TAIL = re.compile(r"Peak VRAM (n/a|[\d.]+GB) \| Peak RAM [\d.]+GB$")
GB = 1024 ** 3


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory):
    return build_fake_folder(tmp_path_factory.mktemp("hy3") / "HunyuanImage-3-fake")


@pytest.fixture(scope="module")
def int8(fake_folder):
    return load_hf_model(fake_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True)


@pytest.fixture(scope="module")
def nf4(fake_folder):
    return load_hf_model(fake_folder, "nf4", trust_remote_code=True)


def _request(**kw):
    base = dict(prompt="a red fox", seed=3, steps=2, guidance=2.0, width=64, height=64, offload_mode="smart")
    base.update(kw)
    return GenerateRequest(**base)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# These run the CPU road and assert what it does (layers on "cpu", the no-CUDA status, zero GPUs present); on a GPU
# machine the loader takes the CUDA road, which tests/test_hunyuan3_gpu.py checks instead.
CPU_ROAD = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU road; tests/test_hunyuan3_gpu.py covers CUDA")


@CPU_ROAD
@pytest.mark.parametrize("which", ["int8", "nf4"])
def test_every_skip_pattern_kept_its_layer_and_every_other_linear_is_quantized(which, request):
    loaded = request.getfixturevalue(which)
    expected_cls = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[which]
    linears = _linears(loaded.model)
    kept = {n for n in linears if any(p in n for p in HUNYUAN3_SKIP_PATTERNS)}
    assert kept and len(kept) < len(linears)
    for name, module in linears.items():
        if name in kept:
            assert type(module) is nn.Linear and module.weight.is_floating_point(), name
        else:
            assert type(module).__name__ == expected_cls, name
    for layer in range(2):
        assert linears[f"model.layers.{layer}.mlp.gate.wg"].weight.dtype == torch.float32  # the router
        for e in range(4):
            assert is_bnb_quantized(linears[f"model.layers.{layer}.mlp.experts.{e}.gate_and_up_proj"])
    report = loaded.dtype_report
    assert report.leaks == [] and set(report.quantized) == set(linears) - kept
    assert {"int8": "int8", "nf4": "nf4/fp4"}[which] in report.dtypes
    assert loaded.placement.units["vae"] == "cpu" and "cpu" in str(loaded.placement)
    assert loaded.telemetry["peak_rss_bytes"] > 0


@CPU_ROAD
def test_generate_image_and_status(int8):
    steps = []
    result = generate(int8, _request(width=60, height=68), on_step=lambda i, n: steps.append((i, n)))
    from comfyui_headroom.integrations.hunyuan3.generate import resolution_buckets

    assert result.image.size == (result.width, result.height)
    assert (result.width, result.height) in resolution_buckets(int8.model) and (result.width, result.height) != (60, 68)
    assert "60x68 -> bucket" in result.status
    assert steps == [(1, 2), (2, 2)]
    assert STATUS_TAIL.search(result.status), result.status
    assert "no_cuda" in result.status
    arr = np.asarray(result.image)
    assert arr.std() > 1  # a picture, not a constant


def test_cancel_from_the_step_callback_stops_the_run(int8):
    class Interrupted(Exception):
        pass

    def cancel(i, n):
        raise Interrupted

    with pytest.raises(Interrupted):
        generate(int8, _request(steps=3), on_step=cancel)


def test_oom_is_caught_with_advice_and_parked_modules_come_back(int8, monkeypatch):
    def boom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(int8.model, "generate_image", boom)
    with pytest.raises(GenerationOOM) as info:
        generate(int8, _request())
    text = str(info.value)
    assert "budget" in text and "smart" in text and "resolution" in text and "64x64" in text


def test_input_image_is_refused_for_a_text_to_image_model(int8):
    from PIL import Image

    with pytest.raises(ValueError, match="Instruct"):
        generate(int8, _request(image=Image.new("RGB", (64, 64))))


def test_save_quantized_selective_then_reload_gives_the_same_image(int8, tmp_path):
    out = save_quantized(int8, tmp_path / "int8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_method"] == "bitsandbytes_int8"
    again = load_hf_model(out, "int8", int8_engine="bitsandbytes", trust_remote_code=True)
    assert again.quantization_method == "bitsandbytes_int8" and "Selective" in again.critical_layers
    a = generate(int8, _request()).image
    b = generate(again, _request()).image
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_int8_full_folder_dequantizes_critical_layers(fake_folder, tmp_path):
    everything = load_hf_model(fake_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True, skip_patterns=[])
    assert is_bnb_quantized(everything.model.timestep_emb.mlp[0])
    out = save_quantized(everything, tmp_path / "full")
    assert json.loads((out / "config.json").read_text())["quantization_method"] == "bitsandbytes_int8_full"
    loaded = load_hf_model(out, "nf4", trust_remote_code=True)  # the folder decides the mode
    assert loaded.mode == "int8" and "Full" in loaded.critical_layers and "dequantized" in loaded.critical_layers
    reference = load_hf_model(fake_folder, "bf16", trust_remote_code=True)
    for name in ("timestep_emb.mlp.0", "lm_head", "model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.gate.wg"):
        got = loaded.model.get_submodule(name).weight
        want = reference.model.get_submodule(name).weight
        assert type(loaded.model.get_submodule(name)) is nn.Linear and got.dtype == want.dtype, name
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err < 0.02, (name, err)  # INT8 round trip, not the raw int8 values


def test_generation_config_fields_are_restored(int8, fake_folder):
    gen = int8.model.generation_config
    saved = {k: getattr(gen, k) for k in ("bot_task", "diff_infer_steps", "use_system_prompt")}
    for k in saved:
        delattr(gen, k) if k in gen.__dict__ else None
    with pytest.raises(AttributeError):
        int8.model.generate_image("x", seed=0, image_size=(64, 64))
    restored = hf_loader.restore_generation_config(int8.model, fake_folder)
    assert set(saved) <= set(restored)
    assert {k: getattr(gen, k) for k in saved} == saved


def test_tencent_code_is_refused_where_the_transformers_5_shims_cannot_bridge_it(monkeypatch):
    """No CUDA: refused. A HunyuanStaticCache that is no StaticCache of this transformers (the shims bridge that
    API), or a transformers major version after 5: refused with the reason and the pip command. 4.x: fine.
    (Tencent's real cache written the 4.x way passes under 5.x: tests/test_hunyuan3_compat.py.)"""
    import types

    from comfyui_headroom.integrations.hunyuan3 import compat

    module = types.ModuleType("fake_tencent_hunyuan")
    module.HunyuanStaticCache = type("HunyuanStaticCache", (), {})
    cls = type("HunyuanImage3ForCausalMM", (nn.Module,), {"__module__": "fake_tencent_hunyuan"})
    monkeypatch.setitem(sys.modules, "fake_tencent_hunyuan", module)
    skeleton = cls()
    assert hf_loader.is_tencent_code(skeleton)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LoaderError, match="CUDA only"):
        hf_loader.check_transformers_version(skeleton, "/models/HunyuanImage-3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compat, "transformers_major", lambda: 5)
    with pytest.raises(LoaderError, match=re.escape(hf_loader.TENCENT_PIP_COMMAND)) as info:
        hf_loader.check_transformers_version(skeleton, "/models/HunyuanImage-3")
    assert "HunyuanStaticCache is not a subclass of this transformers' StaticCache" in str(info.value)
    monkeypatch.setattr(compat, "transformers_major", lambda: 6)
    with pytest.raises(LoaderError, match=r"6\.x is not known to them.*" + re.escape(hf_loader.TENCENT_PIP_COMMAND)):
        hf_loader.check_transformers_version(skeleton, "/models/HunyuanImage-3")
    monkeypatch.setattr(compat, "transformers_major", lambda: 4)
    hf_loader.check_transformers_version(skeleton, "/models/HunyuanImage-3")  # fine under 4.x


def test_the_fake_is_not_taken_for_tencent_code(int8):
    assert not int8.tencent_code


def test_remote_code_needs_consent_and_a_local_folder(fake_folder, tmp_path):
    with pytest.raises(LoaderError, match="trust_remote_code"):
        load_hf_model(fake_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=False)
    with pytest.raises(LoaderError, match="local folder"):
        load_hf_model("tencent/HunyuanImage-3.0", "int8", int8_engine="bitsandbytes", trust_remote_code=True)


@CPU_ROAD
def test_multi_gpu_budgets_are_checked_before_loading(fake_folder, monkeypatch):
    """gpu_budgets_gb fails with the numbers, before any weight is read: no GPU here (any mode), a manual map."""
    read = []
    monkeypatch.setattr(hf_loader, "_from_pretrained_tracked", lambda *args, **kwargs: read.append(args))
    with pytest.raises(LoaderError, match=r"gpu_budgets_gb='40,40' needs at least one CUDA GPU, but 0 are present"):
        load_hf_model(fake_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True, gpu_budgets_gb="40,40")
    with pytest.raises(LoaderError, match="needs at least one CUDA GPU"):
        load_hf_model(fake_folder, "bf16", trust_remote_code=True, gpu_budgets_gb="40,40")
    with pytest.raises(LoaderError, match="leave device_map at 'auto'"):
        load_hf_model(fake_folder, "nf4", trust_remote_code=True, gpu_budgets_gb="24", device_map="manual",
                      gpu_layers=2)
    assert read == []


def test_budget_to_max_memory():
    total = 96 * GB
    mm = max_memory_for_budget(0, 0, total_bytes=total, cpu_bytes=100 * GB)
    assert mm == {0: int(total * 0.55), "cpu": 100 * GB}
    assert max_memory_for_budget(20, 0, total_bytes=total, external_vram_gb=4, cpu_bytes=1)[0] == 16 * GB
    with pytest.raises(ValueError, match="external"):
        max_memory_for_budget(4, 0, total_bytes=total, external_vram_gb=4, cpu_bytes=1)


def test_manual_map_from_n_and_validation_names_what_is_missing(int8):
    skeleton = int8.model
    device_map = manual_device_map(skeleton, gpu_layers=1, device=0)
    assert device_map["model.layers.0"] == 0 and device_map["model.layers.1"] == "cpu"
    assert device_map["vae"] == 0 and device_map["model.wte"] == 0 and device_map["lm_head"] == 0
    broken = dict(device_map)
    del broken["model.layers.1"]  # the community loaders' example map forgot model.layers.24
    with pytest.raises(DeviceMapError, match=r"not placed: model\.layers\.1\b"):
        validate_device_map(broken, skeleton)
    with pytest.raises(DeviceMapError, match="name no module"):
        validate_device_map({**device_map, "model.layers.7": 0}, skeleton)


def test_quantized_plan_evicts_idle_float_modules_before_layers(int8):
    model = int8.model
    quantized = set(int8.skip_plan.quantize)
    full = plan_quantized_map(model, 10 * GB, lambda n: n in quantized, 1.0)
    assert not full.needs_fp32_cpu_offload and set(full.device_map.values()) == {0}
    tight = plan_quantized_map(model, full.gpu_bytes - 1, lambda n: n in quantized, 1.0)
    cpu = [u for u, d in tight.device_map.items() if d == "cpu"]
    assert cpu and all(u.split(".")[0] in ("vision_model", "vision_aligner", "lm_head", "vae") for u in cpu)
    assert tight.needs_fp32_cpu_offload and not tight.float_layers_on_cpu
    tiny = plan_quantized_map(model, 1, lambda n: n in quantized, 1.0)
    assert tiny.float_layers_on_cpu == ["model.layers.1", "model.layers.0"]


def test_node_cache_reuses_and_reloads_when_the_folder_changes(fake_folder, tmp_path):
    from comfyui_headroom.nodes import hunyuan3_nodes as nodes

    folder = tmp_path / "copy"
    shutil.copytree(fake_folder, folder)
    first, reused = nodes.load_cached(str(folder), "nf4", 0.0, 0.0, True, "sdpa")
    second, reused2 = nodes.load_cached(str(folder), "nf4", 0.0, 0.0, True, "sdpa")
    assert second is first and reused2 and not reused
    later = time.time() + 5
    os.utime(folder / "generation_config.json", (later, later))
    third, reused3 = nodes.load_cached(str(folder), "nf4", 0.0, 0.0, True, "sdpa")
    assert third is not first and not reused3
    out = nodes.Hunyuan3GenerateLowVramBudget().generate(third, "a fox", 1, 2, 2.0, 64, 64, "smart", "unload")
    image, status = out["result"]
    assert out["ui"]["text"] == [status]
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert STATUS_TAIL.search(status) and "unloaded" in status
    assert nodes.CACHE.loaded is None and third.model is None  # post_action unload dropped it
    image, status = nodes.Hunyuan3GenerateLargeBudget().generate(third, "a fox", 1, 2, 2.0, 64, 64, "smart", "keep")["result"]
    assert "reloaded" in status and nodes.CACHE.loaded is third and third.model is not None


@CPU_ROAD
def test_int8_soft_unload_parks_in_flat_host_buffers_and_keeps_the_function(int8):
    """memory's soft unload on LLM.int8 layers (CUDA->pinned in production) on the CPU: every tensor, the int8
    weight's CB and the LLM.int8 scales land in the flat host buffers, and the model computes the same."""
    from comfyui_headroom.memory.unload import restore, soft_unload

    def inside(tensor, buffers):
        return any(b.data_ptr() <= tensor.data_ptr() < b.data_ptr() + b.numel() for b in buffers)

    want = np.asarray(generate(int8, _request()).image)
    layer = int8.model.model.layers[0].mlp.experts[0].down_proj
    handle = soft_unload(int8.model, pin_memory=False)
    buffers = [chunk.host for chunk in handle.chunks]
    assert handle.nbytes > 0 and sum(b.numel() for b in buffers) >= handle.nbytes
    assert inside(layer.weight, buffers)
    assert layer.state.CB is None or layer.state.CB.data_ptr() == layer.weight.data_ptr()
    scales = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    assert inside(scales, buffers)
    assert np.array_equal(want, np.asarray(generate(int8, _request()).image))
    restore(int8.model)
    again = soft_unload(int8.model, pin_memory=False)
    assert again is handle and again.reused and again.nbytes == handle.nbytes  # reused
    assert [chunk.host.data_ptr() for chunk in again.chunks] == [b.data_ptr() for b in buffers]
    restore(int8.model)


def test_bf16_stream_map_fits_layers_and_leaves_room_for_the_ring(int8):
    from comfyui_headroom.integrations.hunyuan3.placement import bf16_stream_map, top_level_units, unit_bytes

    model = int8.model
    units = top_level_units(model)
    sizes = unit_bytes(model, units, lambda n: False, 0.0)
    layer = sizes["model.layers.0"]
    rest = sum(b for u, b in sizes.items() if not u.startswith("model.layers."))
    device_map, n = bf16_stream_map(model, rest + 3 * layer, device=0)  # one resident + a 2-slot ring
    assert n == 1 and device_map["model.layers.0"] == 0 and device_map["model.layers.1"] == "cpu"
    assert device_map["vae"] == 0 and device_map["model.wte"] == 0
    assert bf16_stream_map(model, 10 * GB, device=0)[1] == 2
    assert bf16_stream_map(model, 10 * GB, device=0, gpu_layers=0)[0]["model.layers.0"] == "cpu"


@CPU_ROAD
def test_accelerate_offload_is_taken_back_without_changing_the_model(fake_folder):
    """What the BF16 loader does after from_pretrained put layers in RAM behind accelerate's hooks (simulated on
    the CPU: every unit offloaded, execution device cuda:0, as accelerate does for "cpu" map entries)."""
    from accelerate import dispatch_model
    from comfyui_headroom.integrations.hunyuan3.placement import top_level_units, undo_accelerate_offload

    loaded = load_hf_model(fake_folder, "bf16", trust_remote_code=True)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dispatch_model(model, device_map={u: "cpu" for u in top_level_units(model)}, main_device="cuda:0",
                   force_hooks=True, offload_buffers=True)
    assert any(p.device.type == "meta" for p in model.parameters())
    assert undo_accelerate_offload(model) > 0
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in model.modules()) and "to" not in model.__dict__
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert generate(loaded, _request()).image.size == (64, 64)


@CPU_ROAD
def test_block_streaming_of_the_decoder_layers_keeps_the_image(fake_folder):
    """The BF16 road's streaming call (first N layers resident, the rest streamed) on the CPU device."""
    from comfyui_headroom.memory.streaming import enable_block_streaming

    loaded = load_hf_model(fake_folder, "bf16", trust_remote_code=True)
    want = np.asarray(generate(loaded, _request()).image)
    streamer = enable_block_streaming(loaded.model, "cpu", blocks="model.layers", blocks_resident=1, order="first")
    assert streamer.streamed_indices == [1]
    assert np.array_equal(want, np.asarray(generate(loaded, _request()).image))
    streamer.disable()
