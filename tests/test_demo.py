"""`headroom demo`: the model it makes, its sampling loop, its cache, and the whole run in a subprocess."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_headroom import cli
from comfyui_headroom.demo.model import SIZES, DemoConfig, build_empty, make_state_dict, param_shapes
from comfyui_headroom.demo.run import (
    default_budget_bytes,
    ensure_checkpoint,
    ensure_int8,
    format_report,
    load_bf16_model,
    load_int8_model,
    place,
)
from comfyui_headroom.demo.sampling import (
    cosine_similarity,
    decode,
    initial_noise,
    psnr_db,
    sample,
    shifted_timesteps,
)
from comfyui_headroom.quant import Int8Linear, quantize_model, relative_error

MICRO = DemoConfig(hidden=64, depth=2, heads=2, latent_channels=4, latent_size=8)
REPORT_KEYS = ("kernel", "blocks_resident", "blocks_streamed", "step_time_int8_s", "step_time_bf16_s",
               "cosine", "psnr_db", "peak_vram_gb", "peak_ram_gb", "image")


def test_demo_runs_end_to_end_on_cpu(tmp_path):
    """The README's command on the tiny size: a real file -> converter -> INT8 load -> sampling -> PNG."""
    env = dict(os.environ, HEADROOM_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "comfyui_headroom", "demo", "--size", "tiny", "--device", "cpu",
           "--steps", "2", "--json", "--out", str(tmp_path / "out")]
    # cwd outside the repo: `python -m` puts the cwd on sys.path, where our kernels/ would shadow HF `kernels`
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for key in REPORT_KEYS:
        assert key in report, key
    assert report["checkpoint"].startswith(str(tmp_path / "cache" / "demo"))
    assert report["checkpoint_created"] and report["int8_converted"]
    assert report["int8_layers"] == 5 * SIZES["tiny"].depth  # qkv, proj, fc1, fc2, modulation per block
    assert report["float_linear_layers"] == 5  # patch_embed, time_embed x2, final_layer x2
    assert report["blocks_resident"] + report["blocks_streamed"] == SIZES["tiny"].depth
    assert report["kernel"] in report["kernel_calls"] and report["kernel_calls"][report["kernel"]] > 0
    assert report["step_time_int8_s"] > 0 and report["step_time_bf16_s"] > 0
    # INT8 is close to bf16 but not the same computation.
    assert 0.99 <= report["cosine"] < 1.0
    assert report["psnr_db"] is not None and 25.0 <= report["psnr_db"] < 100.0
    with Image.open(report["image"]) as image:
        image.verify()
    with Image.open(report["image"]) as image:
        side = SIZES["tiny"].latent_size * 8
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (side, side)
        pixels = np.asarray(image)
    assert pixels.std() > 10  # not a flat image
    text = format_report(report)
    assert "kernel     : " + report["kernel"] in text and report["image"] in text
    # CPU: the reference kernel runs, so no block takes producer input and nothing is graphed
    assert report["int8_producers"] is False and report["cuda_graphs"] is False
    assert "fused producers" not in text and "CUDA graphs" not in text
    assert f"cosine {report['cosine']:.6f}" in text and "CPU: no VRAM budget" in text
    gpu = dict(report, device="cuda", gpu="Some GPU", budget_gb=0.5, budget_default=True, blocks_resident=1,
               blocks_streamed=1, weights_vram_gb=0.4, blocks_resident_bf16=0, blocks_streamed_bf16=2,
               weights_vram_bf16_gb=0.5)
    gpu_text = format_report(gpu)
    assert "budget     : 0.50 GB" in gpu_text and "INT8 1 resident + 1 streamed" in gpu_text
    assert "bf16 0 resident + 2 streamed" in gpu_text and "on Some GPU" in gpu_text
    fed = format_report(dict(gpu, int8_producers=True, cuda_graphs=True))
    assert "(block inputs written in INT8 by fused producers)" in fed and "both replayed from CUDA graphs" in fed


def test_same_seed_same_model_other_seed_other_model():
    a, b, c = make_state_dict(MICRO, seed=3), make_state_dict(MICRO, seed=3), make_state_dict(MICRO, seed=4)
    assert list(a) == list(param_shapes(MICRO))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())


def test_model_forward_is_deterministic_and_depends_on_time():
    model = build_empty(MICRO)
    model.load_state_dict(make_state_dict(MICRO, seed=0, dtype=torch.float32), assign=True)
    x = initial_noise(MICRO.latent_channels, MICRO.latent_size, seed=1)
    with torch.no_grad():
        v1, v2 = model(x, torch.tensor([0.5])), model(x, torch.tensor([0.5]))
        v3 = model(x, torch.tensor([0.9]))
    assert v1.shape == x.shape
    assert torch.equal(v1, v2)
    assert not torch.allclose(v1, v3)
    assert 0.05 < float(v1.std()) < 20  # activations neither vanish nor explode through the blocks


def test_tokens_option_keeps_weights_and_changes_latent():
    cfg = SIZES["small"].with_tokens(256)
    assert cfg.tokens == 256 and cfg.latent_size == 32
    assert param_shapes(cfg) == param_shapes(SIZES["small"])
    with pytest.raises(ValueError, match="perfect square"):
        SIZES["small"].with_tokens(1000)


def test_euler_sampler_follows_a_straight_flow_exactly():
    """With the exact velocity of a single target, rectified-flow Euler lands on the target."""
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = initial_noise(4, 8, seed=6)

    def ideal_velocity(x, t):
        return (x - target) / t.reshape(-1, 1, 1, 1)

    result = sample(ideal_velocity, noise, steps=5, device="cpu", warmup=False)
    assert torch.allclose(result.latent, target, atol=1e-5)
    assert len(result.step_times_s) == 5


def test_timesteps_run_from_noise_to_data():
    t = shifted_timesteps(6, shift=3.0)
    assert t[0] == 1.0 and t[-1] == 0.0 and len(t) == 7
    assert bool((t[1:] < t[:-1]).all())
    assert float(t[3]) > 0.5  # shifted: more steps at high noise


def test_decoder_and_metrics():
    latent = initial_noise(16, 4, seed=0)
    image = decode(latent)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(decode(latent), image)
    assert psnr_db(image, image) == float("inf")
    noisy = np.clip(image.astype(int) + 3, 0, 255).astype(np.uint8)
    assert 30 < psnr_db(image, noisy) < 45
    assert cosine_similarity(latent, latent) == pytest.approx(1.0)
    assert cosine_similarity(latent, -latent) == pytest.approx(-1.0)


def test_checkpoint_is_created_once_then_reused(tmp_path, caplog):
    caplog.set_level("INFO", logger="comfyui_headroom.demo")
    path, created = ensure_checkpoint("micro", MICRO, seed=7, folder=tmp_path)
    mtime = path.stat().st_mtime_ns
    again, created_again = ensure_checkpoint("micro", MICRO, seed=7, folder=tmp_path)
    assert created and not created_again and again == path
    assert path.stat().st_mtime_ns == mtime
    assert "reusing cached checkpoint" in caplog.text
    other, _ = ensure_checkpoint("micro", MICRO, seed=8, folder=tmp_path)
    assert other != path


def test_checkpoint_of_another_shape_or_truncated_is_rebuilt(tmp_path):
    path, _ = ensure_checkpoint("micro", MICRO, seed=0, folder=tmp_path)
    wider = replace(MICRO, hidden=128)
    _, created = ensure_checkpoint("micro", wider, seed=0, folder=tmp_path)
    assert created
    path.write_bytes(path.read_bytes()[:100])
    _, created = ensure_checkpoint("micro", wider, seed=0, folder=tmp_path)
    assert created


def test_converted_file_loads_into_int8_layers(tmp_path):
    """A model wide enough for the default shape rules: the converter's file comes back as Int8Linear
    layers (block Linears only) and computes close to the bf16 model."""
    cfg = DemoConfig(hidden=1024, depth=1, heads=8, mlp_ratio=1, latent_channels=4, latent_size=4)
    src, _ = ensure_checkpoint("wide", cfg, seed=0, folder=tmp_path)
    dst, converted, _ = ensure_int8(src, "rowwise")
    _, converted_again, _ = ensure_int8(src, "rowwise")
    assert converted and not converted_again
    model, int8_layers, float_layers = load_int8_model(dst, cfg)
    assert int8_layers == 5 and float_layers == 5
    assert isinstance(model.blocks[0].mlp.fc1, Int8Linear) and isinstance(model.blocks[0].modulation, Int8Linear)
    assert not isinstance(model.patch_embed, Int8Linear) and not isinstance(model.final_layer.linear, Int8Linear)
    ref = load_bf16_model(src, cfg, "cpu")
    x = initial_noise(cfg.latent_channels, cfg.latent_size, seed=2)
    with torch.no_grad():
        out, expected = model(x, torch.tensor([0.7])), ref(x, torch.tensor([0.7]))
    assert 0.99 < cosine_similarity(out, expected) < 1.0


def test_int8_model_under_the_default_budget_streams_and_computes_the_same(gen):
    """The demo's GPU default (half the blocks' bytes), run on the CPU through the same streaming hooks."""
    cfg = replace(MICRO, depth=12)
    model = build_empty(cfg)
    model.load_state_dict(make_state_dict(cfg, seed=0), assign=True)
    quantize_model(model, min_features=32)
    assert isinstance(model.blocks[11].attn.qkv, Int8Linear)
    x = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)
    t = torch.tensor([0.3])
    budget = default_budget_bytes(model)
    with torch.no_grad():
        resident = model(x, t)
        placement = place(model, torch.device("cpu"), budget)
        try:
            assert placement.blocks_resident + placement.blocks_streamed == 12
            assert 0 < placement.blocks_resident < placement.blocks_streamed
            assert placement.weights_vram_bytes <= budget
            assert torch.equal(model(x, t), resident)
            assert torch.equal(model(x, t), resident)  # second pass: the ring wrapped around
        finally:
            placement.release()
        assert torch.equal(model(x, t), resident)


def test_bad_tokens_is_a_one_line_user_error(capsys, tmp_path):
    code = cli.main(["demo", "--tokens", "1000", "--device", "cpu", "--cache-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "perfect square" in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_on_gpu_uses_producers_and_cuda_graphs(tmp_path):
    """On a GPU the INT8 blocks take producer input and replay from CUDA graphs; the result still matches bf16."""
    from comfyui_headroom.demo.run import DemoOptions, run_demo

    report = run_demo(DemoOptions(size="tiny", device="cuda", steps=3, cache_dir=str(tmp_path / "cache"),
                                  out_dir=str(tmp_path / "out")))
    facts = {k: report[k] for k in ("int8_producers", "cuda_graphs", "kernel", "kernel_calls", "cosine")}
    assert report["int8_producers"] is True, facts
    assert report["cuda_graphs"] is True, facts
    assert report["kernel"] == "triton_w8a8", facts
    assert report["cosine"] > 0.999, facts
    eager = run_demo(DemoOptions(size="tiny", device="cuda", steps=3, cache_dir=str(tmp_path / "cache"),
                                 out_dir=str(tmp_path / "out"), cuda_graphs=False))
    assert eager["cuda_graphs"] is False and abs(eager["cosine"] - report["cosine"]) < 1e-4


def test_demo_writes_its_images_to_the_cache_folder_not_the_current_one(tmp_path, monkeypatch):
    """Without --out the PNGs go next to the cached checkpoints (a checkout must not fill up with them), the report
    says where, and on a CPU the step-time line says why INT8 is not faster there."""
    from comfyui_headroom.demo.run import DemoOptions, format_report, run_demo

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    cache = tmp_path / "cache"
    report = run_demo(DemoOptions(size="tiny", device="cpu", steps=2, cache_dir=str(cache)))
    assert list(work.iterdir()) == []
    assert os.path.dirname(report["image"]) == str(cache) and os.path.exists(report["image"])
    text = format_report(report)
    assert f"image      : {report['image']}" in text
    assert "reference path, not meant to be faster" in text.splitlines()[6]


def test_rotated_file_loads_as_rotated_int8_layers(tmp_path):
    """A file converted with --rotate holds Q(W H): the demo's loader must hand the rotation group to each
    Int8Linear (read as plain, the rotated weight computes garbage)."""
    from comfyui_headroom.quant.convert import convert_file

    cfg = DemoConfig(hidden=1024, depth=1, heads=8, mlp_ratio=1, latent_channels=4, latent_size=4)
    src, _ = ensure_checkpoint("wide", cfg, seed=0, folder=tmp_path)
    dst = tmp_path / "rotated.safetensors"
    report = convert_file(src, dst, rotate=256, progress=False)
    assert len(report.rotated) == 5
    model, int8_layers, _ = load_int8_model(dst, cfg)
    assert int8_layers == 5
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.rotation_group == 256
    ref = load_bf16_model(src, cfg, "cpu")
    weight = ref.blocks[0].mlp.fc1.weight.float()
    assert relative_error(fc1.dequantized_weight(torch.float32), weight) < 0.02
    x = initial_noise(cfg.latent_channels, cfg.latent_size, seed=2)
    with torch.no_grad():
        out, expected = model(x, torch.tensor([0.7])), ref(x, torch.tensor([0.7]))
    assert 0.99 < cosine_similarity(out, expected) < 1.0


def test_demo_with_a_ram_budget_streams_int8_blocks_from_disk_bit_for_bit(tmp_path, monkeypatch):
    """`headroom demo --ram-budget-gb X` below the model's size: most INT8 blocks are read from the file on every
    step, the output is bit for bit the run without a RAM budget, and the report has the disk tier's keys."""
    from comfyui_headroom.demo.run import DemoOptions, run_demo

    cfg = DemoConfig(hidden=1024, depth=6, heads=8, mlp_ratio=1, latent_channels=4, latent_size=8)
    monkeypatch.setitem(SIZES, "wide6", cfg)
    block_mb = (6 + 3 + 1 + 1 + 1) * 1024 * 1024 / 2 ** 20  # INT8 weights of one block (scales, biases on top)
    ram_gb = (4 * block_mb + 2) / 1024  # a ring of 3 read buffers + one block in RAM
    report = run_demo(DemoOptions(size="wide6", device="cpu", steps=2, cache_dir=str(tmp_path / "cache"),
                                  out_dir=str(tmp_path / "out"), ram_budget_gb=ram_gb))
    assert report["int8_layers"] == 5 * 6
    assert (report["blocks_on_gpu"], report["blocks_in_ram"], report["blocks_on_disk"]) == (0, 1, 5)
    assert report["equal_to_resident"] is True
    assert report["disk_read_gb_s"] > 0 and report["peak_ram_gb"] > 0
    json.dumps(report)
    assert "0 on the device, 1 in RAM, 5 on disk" in format_report(report) and "bit for bit equal" in format_report(report)
    plain = run_demo(DemoOptions(size="wide6", device="cpu", steps=2, cache_dir=str(tmp_path / "cache"),
                                 out_dir=str(tmp_path / "out")))
    assert plain["equal_to_resident"] is None and plain["blocks_on_disk"] == 0 and plain["disk_read_gb_s"] is None
    assert plain["cosine"] == report["cosine"]  # the same INT8 latent, compared with the same bf16 run
