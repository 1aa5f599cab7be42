"""HunyuanImage-3 road on the GPU: seconds per denoising step of a tiny-but-wide fake (the real module tree,
8 decoder layers, hidden 1024, 4 experts) loaded five ways, and soft unload / restore timings.

    python bench/hunyuan3_road.py --out DIR     (needs CUDA; writes DIR/hunyuan3_bench.json and .md)

Rows: INT8 (bitsandbytes) resident, NF4 resident, BF16 resident, BF16 with half of the decoder layers in RAM
moved by accelerate's hooks (what seed 001 measured at 3.8x slower than INT8), and BF16 with the same half
streamed by our block streaming (pinned, prefetched). Ratios are against INT8 resident in the same run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIDE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, attention_head_dim=128,
            moe_intermediate_size=2048, num_experts=4, moe_topk=2, image_base_size=256, patch_embed_hidden_dim=128,
            vocab_size=512, vit_aligner={"input_dim": 64, "n_embed": 1024})


def _builder():
    spec = importlib.util.spec_from_file_location("build_fake", ROOT / "tests/fixtures/hunyuan3_fake/build_fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def time_generate(loaded_or_model, steps: int, size: int, repeats: int = 2) -> dict:
    """Median seconds per step over ``repeats`` runs after a warm-up run."""
    from comfyui_headroom.memory.hf_generate import GenerateRequest, generate

    request = GenerateRequest(prompt="a lighthouse at dusk", seed=1, steps=steps, guidance=1.0, width=size,
                              height=size, offload_mode="disabled")
    if hasattr(loaded_or_model, "model"):
        run = lambda: generate(loaded_or_model, request)  # noqa: E731
    else:
        model = loaded_or_model
        run = lambda: model.generate_image(request.prompt, seed=1, image_size=(size, size),  # noqa: E731
                                           diff_infer_steps=steps, diff_guidance_scale=1.0)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"s_per_step": times[len(times) // 2] / steps, "peak_vram_gb": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    from accelerate.hooks import remove_hook_from_module  # noqa: F401
    from transformers import AutoModelForCausalLM

    from comfyui_headroom.memory.hf_generate import restore_model, soft_unload_model
    from comfyui_headroom.memory.hf_placement import manual_device_map
    from comfyui_headroom.quant.hf_loader import load_hf_model

    folder = Path("/tmp/hy3_wide")
    t0 = time.perf_counter()
    _builder().build_fake_model_folder(folder, **WIDE)
    print(f"built wide fake in {time.perf_counter() - t0:.1f}s", flush=True)
    half = WIDE["num_hidden_layers"] // 2
    rows = {}

    for mode in ("int8", "nf4", "bf16"):
        loaded = load_hf_model(folder, mode, budget_gb=20, trust_remote_code=True)
        rows[f"{mode} resident"] = time_generate(loaded, args.steps, args.size)
        rows[f"{mode} resident"]["load_s"] = loaded.telemetry.get("wall_s")
        if mode in ("int8", "nf4"):
            before = torch.cuda.memory_allocated()
            t = time.perf_counter()
            soft_unload_model(loaded)
            unload_s = time.perf_counter() - t
            parked = torch.cuda.memory_allocated()
            t = time.perf_counter()
            restore_model(loaded)
            torch.cuda.synchronize()
            restore_s = time.perf_counter() - t
            wbytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
            rows[f"{mode} resident"].update(soft_unload_s=unload_s, restore_s=restore_s, weights_gb=wbytes / 2**30,
                                            vram_parked_gb=parked / 2**30, vram_loaded_gb=before / 2**30,
                                            restore_gb_per_s=wbytes / 2**30 / restore_s)
        print(mode, rows[f"{mode} resident"], flush=True)
        del loaded
        _free()

    # BF16, half the layers in RAM: accelerate's hooks (synchronous copies) ...
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    device_map = manual_device_map(skeleton, half, 0)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                 device_map=device_map)
    rows["bf16 accelerate offload (half the layers)"] = time_generate(model, args.steps, args.size)
    print("accelerate", rows["bf16 accelerate offload (half the layers)"], flush=True)
    del model
    _free()

    # ... and ours: the same half streamed from pinned RAM with prefetch.
    loaded = load_hf_model(folder, "bf16", trust_remote_code=True, device_map="manual", gpu_layers=half)
    rows["bf16 headroom streaming (half the layers)"] = time_generate(loaded, args.steps, args.size)
    rows["bf16 headroom streaming (half the layers)"]["streamer"] = loaded.streamer.summary()
    print("ours", rows["bf16 headroom streaming (half the layers)"], flush=True)
    del loaded
    _free()

    base = rows["int8 resident"]["s_per_step"]
    for row in rows.values():
        row["vs_int8"] = row["s_per_step"] / base
    device = torch.cuda.get_device_name(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hunyuan3_bench.json").write_text(json.dumps({"device": device, "rows": rows, "config": WIDE,
                                                          "steps": args.steps, "size": args.size}, indent=2))
    lines = [f"| configuration ({device}, {args.size}x{args.size}, {args.steps} steps) | ms / step | x INT8 | peak VRAM GB |",
             "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['s_per_step'] * 1000:.1f} | {row['vs_int8']:.2f} | {row['peak_vram_gb']:.2f} |")
    for mode in ("int8", "nf4"):
        r = rows[f"{mode} resident"]
        lines.append(f"\n{mode.upper()} soft unload {r['soft_unload_s']:.3f}s / restore {r['restore_s']:.3f}s for "
                     f"{r['weights_gb']:.2f} GB ({r['restore_gb_per_s']:.1f} GB/s); VRAM {r['vram_loaded_gb']:.2f} -> "
                     f"{r['vram_parked_gb']:.2f} GB while parked")
    (out / "hunyuan3_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
