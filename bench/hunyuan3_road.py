"""HunyuanImage-3 road on the GPU: seconds per denoising step of a tiny-but-wide fake (the real module tree,
8 decoder layers, hidden 1024, 4 experts) loaded five ways, and soft unload / restore timings.

    python bench/hunyuan3_road.py --out DIR [--doc docs/PERFORMANCE.md]   (needs CUDA; DIR/hunyuan3_bench.json, .md)
    python bench/hunyuan3_road.py --render DIR/hunyuan3_bench.json --doc docs/PERFORMANCE.md

Rows: INT8 on headroom's engine (W8A8, grouped MoE kernel) resident and with half of the decoder layers streamed
from pinned RAM (step / bound: bound = max(resident step, streamed bytes / pinned h2d bandwidth)), INT8
(bitsandbytes) resident, NF4 resident, BF16 resident, BF16 with half of the decoder layers in RAM
moved by accelerate's hooks (what seed 001 measured at 3.8x slower than INT8), and BF16 with the same half
streamed by our block streaming (pinned, prefetched). Ratios are against INT8 resident in the same run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from benchlib import write_section

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


def time_generate(loaded_or_model, steps: int, size: int, repeats: int = 1) -> dict:
    """Median seconds per step over ``repeats`` runs after a warm-up run (torch.inference_mode)."""
    from comfyui_headroom.integrations.hunyuan3.generate import GenerateRequest

    request = GenerateRequest(prompt="a lighthouse at dusk", seed=1, steps=steps, guidance=1.0, width=size,
                              height=size, offload_mode="disabled")
    # The model's own generate_image for every row (our generate() adds a MemoryTracker, ~50 ms per run).
    from comfyui_headroom.integrations.hunyuan3.loader import LoadedModel

    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    run = lambda: model.generate_image(request.prompt, seed=1, image_size=(size, size),  # noqa: E731
                                       diff_infer_steps=steps, diff_guidance_scale=1.0)
    with torch.inference_mode():
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"s_per_step": times[len(times) // 2] / steps, "peak_vram_gb": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--doc", help="also rewrite the HunyuanImage-3 section of this PERFORMANCE.md")
    parser.add_argument("--render", help="only render this run's JSON into --doc (no GPU needed)")
    args = parser.parse_args(argv)
    if args.render:
        text = render(json.loads(Path(args.render).read_text()))
        if args.doc:
            write_section("HunyuanImage-3", text, Path(args.doc))
        print(text)
        return 0
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    from accelerate.hooks import remove_hook_from_module  # noqa: F401
    from comfyui_headroom.integrations.hunyuan3.generate import restore_model, soft_unload_model
    from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model
    from comfyui_headroom.integrations.hunyuan3.placement import manual_device_map
    from comfyui_headroom.memory.doctor import pinned_h2d_speed
    from transformers import AutoModelForCausalLM

    folder = Path("/tmp/hy3_wide")
    t0 = time.perf_counter()
    _builder().build_fake_model_folder(folder, **WIDE)
    print(f"built wide fake in {time.perf_counter() - t0:.1f}s", flush=True)
    half = WIDE["num_hidden_layers"] // 2
    rows = {}

    def resident(mode, engine="bitsandbytes"):
        loaded = load_hf_model(folder, mode, budget_gb=20, trust_remote_code=True, int8_engine=engine)
        row = time_generate(loaded, args.steps, args.size)
        row["load_s"] = loaded.telemetry.get("wall_s")
        row["engine"] = loaded.engine
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
            # parameters and buffers: our INT8 layers hold their int8 weights and scales as buffers
            wbytes = sum(t.numel() * t.element_size() for t in list(loaded.model.parameters())
                         + list(loaded.model.buffers()))
            row.update(soft_unload_s=unload_s, restore_s=restore_s, weights_gb=wbytes / 2**30,
                       vram_parked_gb=parked / 2**30, vram_loaded_gb=before / 2**30,
                       restore_gb_per_s=wbytes / 2**30 / restore_s)
        return row

    def accelerate_offload():
        # BF16, half the layers in RAM, moved by accelerate's hooks (synchronous copies) ...
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                     device_map=manual_device_map(skeleton, half, 0))
        return time_generate(model, args.steps, args.size)

    def headroom_streaming():
        # ... and ours: the same half streamed from pinned RAM with prefetch.
        loaded = load_hf_model(folder, "bf16", trust_remote_code=True, device_map="manual", gpu_layers=half)
        row = time_generate(loaded, args.steps, args.size)
        row["streamer"] = loaded.streamer.summary()
        return row

    def headroom_int8_streaming():
        # our INT8 engine with the same half of the layers in pinned RAM
        loaded = load_hf_model(folder, "int8", trust_remote_code=True, device_map="manual", gpu_layers=half)
        row = time_generate(loaded, args.steps, args.size)
        row["streamer"] = loaded.streamer.summary()
        streamed = loaded.streamer.streamed_bytes
        row["streamed_gb"] = streamed / 2**30
        row["pinned_h2d_gbps"] = pinned_h2d_speed(1 << 30)
        resident_s = rows.get("headroom int8 resident", {}).get("s_per_step", 0.0)
        # each step moves every streamed layer once per transformer pass (CFG off: one pass per step)
        row["bound_s"] = max(resident_s, row["streamed_gb"] / row["pinned_h2d_gbps"])
        row["step_over_bound"] = row["s_per_step"] / row["bound_s"] if row["bound_s"] else float("nan")
        return row

    configs = [("headroom int8 resident", lambda: resident("int8", "headroom")),
               ("headroom int8 streaming (half the layers)", headroom_int8_streaming),
               ("int8 resident", lambda: resident("int8")), ("nf4 resident", lambda: resident("nf4")),
               ("bf16 resident", lambda: resident("bf16")),
               ("bf16 accelerate offload (half the layers)", accelerate_offload),
               ("bf16 headroom streaming (half the layers)", headroom_streaming)]
    errors = {}
    for name, fn in configs:  # one failure must not hide the other rows
        try:
            rows[name] = fn()
            print(name, rows[name], flush=True)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            import traceback

            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {err}"
        _free()

    base = rows["int8 resident"]["s_per_step"] if "int8 resident" in rows else None
    for row in rows.values():
        row["vs_int8"] = row["s_per_step"] / base if base else float("nan")
    import accelerate
    import bitsandbytes
    import transformers

    data = {"device": torch.cuda.get_device_name(0), "rows": rows, "errors": errors, "config": WIDE, "steps": args.steps,
            "size": args.size, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "bitsandbytes": bitsandbytes.__version__, "accelerate": accelerate.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hunyuan3_bench.json").write_text(json.dumps(data, indent=2))
    text = render(data)
    (out / "hunyuan3_bench.md").write_text(text)
    print(text)
    if args.doc:
        write_section("HunyuanImage-3", text, Path(args.doc))
    return 0


def render(data: dict) -> str:
    """The "## HunyuanImage-3" section body of docs/PERFORMANCE.md from a run's JSON."""
    rows, v = data["rows"], data["versions"]
    c = data["config"]
    lines = [
        f"GPU: {data['device']}; torch {v['torch']}, transformers {v['transformers']}, bitsandbytes "
        f"{v['bitsandbytes']}, accelerate {v['accelerate']}; {data['date']}; command: "
        f"`python bench/hunyuan3_road.py --out DIR` (one run, device tool).",
        "",
        f"Model: the test fake with HunyuanImage-3's module tree (tests/fixtures/hunyuan3_fake), tiny but wide: "
        f"{c['num_hidden_layers']} decoder layers, hidden {c['hidden_size']}, {c['num_experts']} experts (top "
        f"{c['moe_topk']}) of {c['moe_intermediate_size']}, random weights. One `generate_image` at "
        f"{data['size']}x{data['size']}, {data['steps']} steps, CFG off; time per denoising step after a warm-up run. "
        "\"Half the layers\" = the last half of the decoder layers live in RAM.",
        "",
        "| configuration | ms / step | x INT8 resident | peak VRAM GB |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['s_per_step'] * 1000:.1f} | {row['vs_int8']:.2f} | {row['peak_vram_gb']:.2f} |")
    lines.append("")
    ours_int8 = rows.get("headroom int8 resident")
    if ours_int8 and "bf16 resident" in rows:
        lines.append(f"- headroom's INT8 engine: {rows['bf16 resident']['s_per_step'] / ours_int8['s_per_step']:.2f}x "
                     "the bf16 step speed on this model (bitsandbytes' INT8 row below for comparison).")
    streamed = rows.get("headroom int8 streaming (half the layers)")
    if streamed and "step_over_bound" in streamed:
        lines.append(f"- INT8 with half the layers streamed: {streamed['streamed_gb']:.2f} GB per step over "
                     f"{streamed['pinned_h2d_gbps']:.1f} GB/s pinned h2d; step / bound **{streamed['step_over_bound']:.3f}** "
                     "(goal <= 1.10).")
    if "int8 resident" in rows and "bf16 resident" in rows:
        lines.append(f"- bitsandbytes LLM.int8 (outlier threshold 6.0, the transformers default) takes "
                     f"{rows['int8 resident']['s_per_step'] / rows['bf16 resident']['s_per_step']:.1f}x the bf16 step "
                     "time on this model: on this road INT8/NF4 buy memory, not speed (see Kernels for bitsandbytes "
                     "vs bf16 per GEMM).")
    acc = rows.get("bf16 accelerate offload (half the layers)")
    ours = rows.get("bf16 headroom streaming (half the layers)")
    if acc and ours:
        lines += [f"- BF16 with half the layers in RAM: accelerate's hooks {acc['vs_int8']:.2f}x the INT8-resident "
                      f"step time (seed 001 measured 3.8x on the real model), our streaming {ours['vs_int8']:.2f}x: "
                      f"**{acc['s_per_step'] / ours['s_per_step']:.1f}x faster than accelerate**."]
    for name, err in data.get("errors", {}).items():
        lines.append(f"- {name}: not measured in this run - {err}")
    for mode in ("int8", "nf4"):
        for label in (f"{mode} resident", f"headroom {mode} resident"):
            r = rows.get(label, {})
            if "restore_s" in r:
                lines.append(f"- {label}: soft unload {r['soft_unload_s']:.3f} s / restore {r['restore_s']:.3f} s for "
                         f"{r['weights_gb']:.2f} GB of weights ({r['restore_gb_per_s']:.1f} GB/s); VRAM "
                         f"{r['vram_loaded_gb']:.2f} -> {r['vram_parked_gb']:.2f} GB while parked.")
    lines.extend(f"- {note}" for note in data.get("notes", []))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
