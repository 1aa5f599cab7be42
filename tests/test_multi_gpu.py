"""Issue #9 on two real GPUs (device tool, ``nvidia-h200-x2``): the split runs where the CPU tests cannot look -
real cross-device copies, our Triton INT8 kernels and producers on ``cuda:1``, per-device peaks, and the
HunyuanImage-3 loader's ``gpu_budgets_gb`` through accelerate. Skipped below two CUDA GPUs."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from comfyui_headroom.demo.model import DemoConfig, DemoDiT
from comfyui_headroom.memory import MemoryTracker, enable_multi_device
from comfyui_headroom.quant.replace import quantize_model

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (nvidia-h200-x2)")

FIXTURE = Path(__file__).parent / "fixtures" / "hunyuan3_fake"
CFG = DemoConfig(hidden=1024, depth=4, heads=8, latent_size=32)  # 256 tokens: W8A8 (not the M <= 16 path)


def _inputs():
    gen = torch.Generator().manual_seed(5)
    latent = torch.randn(2, CFG.latent_channels, CFG.latent_size, CFG.latent_size, generator=gen)
    return latent.to("cuda:0"), torch.tensor([0.3, 0.8], device="cuda:0")


def _model(int8: bool, depth: int = CFG.depth) -> DemoDiT:
    torch.manual_seed(0)
    model = DemoDiT(dataclasses.replace(CFG, depth=depth)).to(torch.bfloat16)
    if int8:
        quantize_model(model)
        model.use_int8_producers()
    return model.to("cuda:0").eval()


@pytest.mark.parametrize("int8", [False, True])
@torch.no_grad()
def test_demo_model_split_over_two_gpus_equals_one_gpu(int8):
    """bf16 and INT8 (W8A8 + producers on cuda:1 too): the split output is bitwise the one-GPU output."""
    model = _model(int8)
    latent, t = _inputs()
    one_gpu = model(latent, t)
    split = enable_multi_device(model, ["cuda:0", "cuda:1"])
    try:
        assert {str(p.device) for p in model.blocks[0].parameters()} == {"cuda:0"}
        assert {str(b.device) for b in model.blocks[-1].buffers()} | {str(p.device) for p in
                                                                       model.blocks[-1].parameters()} == {"cuda:1"}
        out = model(latent, t)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
    finally:
        split.disable()
    assert out.device == torch.device("cuda:0")
    assert torch.equal(out, one_gpu)
    if int8:
        assert sum(b.producer_forwards for b in model.blocks) == 2 * CFG.depth  # producers ran on both GPUs


@torch.no_grad()
def test_split_with_streamed_blocks_on_two_gpus_equals_one_gpu():
    """One block resident per GPU, three streamed from pinned RAM onto cuda:1 (the device at the end of the chain)
    through a ring of 2 slots, so they are copied again in every call: bitwise the one-GPU output."""
    from comfyui_headroom.memory.planner import plan_placement
    from comfyui_headroom.memory.tensors import module_bytes

    model = _model(int8=True, depth=5)
    latent, t = _inputs()
    one_gpu = model(latent, t)
    block = max(module_bytes(b) for b in model.blocks)
    rest = module_bytes(model) - sum(module_bytes(b) for b in model.blocks)
    plan = plan_placement(model.cpu(), [int(rest + 1.5 * block), int(rest + 3.5 * block)], blocks_resident=2,
                          prefetch=1, devices=["cuda:0", "cuda:1"])
    assert len(plan.streamed) == 3 and plan.stream_device == "cuda:1" and plan.ring_slots == 2, plan.as_dict()
    split = enable_multi_device(model, plan)
    try:
        for _ in range(2):
            out = model(latent, t)
        torch.cuda.synchronize("cuda:1")
        stats = split.streamer.stats
    finally:
        split.disable()
    assert stats.copies >= 5, stats  # 3 streamed blocks, 2 slots: copied again in the second call
    assert torch.equal(out, one_gpu), float((out.float() - one_gpu.float()).abs().max())


@torch.no_grad()
def test_memory_tracker_reports_each_gpu_of_a_split():
    model = _model(int8=True)
    latent, t = _inputs()
    split = enable_multi_device(model, ["cuda:0", "cuda:1"])
    try:
        with MemoryTracker() as tracker:
            model(latent, t)
    finally:
        split.disable()
    report = tracker.report
    assert set(report.devices) >= {"cuda:0", "cuda:1"}
    assert all(report.devices[d].peak_allocated_bytes > 0 for d in ("cuda:0", "cuda:1"))
    assert "cuda:0" in str(report) and "cuda:1" in str(report)


@pytest.mark.parametrize("mode", ["int8", "bf16", "headroom-int8"])
def test_hunyuan3_loader_spreads_over_both_gpus_with_gpu_budgets(tmp_path, mode):
    """gpu_budgets_gb='A,B' with A below the model: INT8 through accelerate's device map (bitsandbytes), BF16 and
    our INT8 engine through our split; layers on cuda:0 and cuda:1, nothing left on the CPU, and it generates."""
    if mode == "int8" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    from comfyui_headroom.integrations.hunyuan3.generate import GenerateRequest, generate
    from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model

    spec = importlib.util.spec_from_file_location("hunyuan3_build_fake", FIXTURE / "build_fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = module.build_fake_model_folder(tmp_path / "fake")
    file_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    # cuda:0 gets less than the model: INT8 (accelerate fills cuda:0 first) a quarter of the bf16 bytes, BF16 (our
    # planner keeps everything before the layers with the first layer) three quarters: those modules + 1 layer
    # (our INT8 engine: the layers at INT8 size, half the bf16 bytes: the same fraction puts one layer on cuda:0)
    first = {"int8": 0.25, "bf16": 0.75, "headroom-int8": 0.4}[mode] * file_bytes / 2**30
    engine = {"int8_engine": "bitsandbytes" if mode == "int8" else "headroom"}
    loaded = load_hf_model(folder, "int8" if mode != "bf16" else "bf16", trust_remote_code=True,
                           gpu_budgets_gb=f"{first:.4f},4", **engine)
    devices = {str(p.device) for p in loaded.model.parameters()}
    assert {"cuda:0", "cuda:1"} <= devices and "cpu" not in devices, devices
    result = generate(loaded, GenerateRequest(prompt="a red fox", seed=3, steps=2, guidance=2.0, width=64,
                                              height=64, offload_mode="disabled"))
    assert result.image is not None and "cuda:1" in result.status


def test_gpu_info_lists_every_gpu():
    from comfyui_headroom.nodes.memory_nodes import gpu_info_text

    text = gpu_info_text()
    assert "cuda:0 " in text and "cuda:1 " in text, text
