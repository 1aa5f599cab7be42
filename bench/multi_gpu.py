"""Multi-GPU (issue #9): one model split across two GPUs vs the same model on one GPU.

    python bench/multi_gpu.py demo  [--size 1b] [--tokens 4096] [--steps 8] [--json OUT.json]
    python bench/multi_gpu.py comfy --comfy /path/to/comfyui [--hidden 3072] [--json OUT.json]
    python bench/multi_gpu.py write RESULT.json [RESULT2.json]   # rewrite "## Multi-GPU" in docs/PERFORMANCE.md

Needs two CUDA GPUs (``nvidia-h200-x2``); with fewer it exits with code 2 and says so. ``--devices cpu,cpu``
only smoke-tests the script (same code path, no real cross-device copies, timings meaningless).

``demo``: the demo's DiT sampled with fixed-seed Euler steps (median step time after a warm-up call, every
step synchronised on both GPUs):

* ``bf16 one GPU`` (anchor) / ``bf16 split 50/50`` (:func:`enable_multi_device`, blocks split evenly by bytes);
* ``INT8 one GPU`` / ``INT8 split 50/50`` (the converter's row-wise file in ``Int8Linear`` layers);
* ``bf16 accelerate device_map`` - accelerate's ``dispatch_model`` over the same two GPUs, same split.

Goals: bf16 split bitwise equal to bf16 one GPU; INT8 split equal to INT8 one GPU and cosine vs bf16 >= 0.99
(the INT8 bound of bench/end_to_end.py); split step time <= 1.10 x one GPU.

``comfy``: a random Flux of ComfyUI's own code (``comfy.sd.load_diffusion_model``, bf16) and the same file
through our INT8 loader, each called once on one GPU and once split over the two (double + single blocks),
outside ComfyUI's model management (which would move the model back to one device).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from benchlib import add_demo_model_args, emit, import_package, versions, write_section

ROOT = Path(__file__).resolve().parents[1]
GOAL_COSINE = 0.99
GOAL_OVERHEAD = 0.10


def _devices(text: str) -> list[torch.device]:
    devices = [torch.device(d.strip()) for d in text.split(",")]
    if len(devices) != 2:
        raise SystemExit(f"--devices must name two devices, got {text!r}")
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < 2:
            print(f"bench/multi_gpu.py needs 2 CUDA GPUs (run it on nvidia-h200-x2); this machine has {have}. "
                  "--devices cpu,cpu only smoke-tests the script.", file=sys.stderr)
            raise SystemExit(2)
    return devices


def _sync(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gpu_name(devices) -> str:
    if devices[0].type != "cuda":
        return f"CPU smoke test ({platform.processor() or 'cpu'})"
    return " + ".join(torch.cuda.get_device_name(d) for d in devices)


def _peaks(devices) -> dict:
    return {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in devices if d.type == "cuda"}


def _reset_peaks(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


# ------------------------------------------------------------------------------------------------- demo


def _measure_demo(name, model, noise, steps, devices, placement, reference=None, same_as=None) -> dict:
    from comfyui_headroom.demo.sampling import cosine_similarity, sample

    def synced(x, t):
        out = model(x, t)
        _sync(devices)
        return out

    _sync(devices)
    _reset_peaks(devices)
    with torch.no_grad():
        result = sample(synced, noise, steps, devices[0], warmup=True)
    row = {"run": name, "placement": placement, "step_ms": result.step_time_s * 1e3,
           "step_ms_all": [t * 1e3 for t in result.step_times_s], "peak_vram_gb": _peaks(devices),
           "latent": result.latent}
    if reference is not None:
        row["cosine_vs_bf16"] = cosine_similarity(result.latent, reference)
        row["bitwise_equal_bf16"] = bool(torch.equal(result.latent, reference))
    if same_as is not None:
        row["max_abs_diff_vs_one_gpu"] = float((result.latent - same_as).abs().max())
        row["bitwise_equal_one_gpu"] = bool(torch.equal(result.latent, same_as))
    print(f"{name:>28}: {row['step_ms']:8.2f} ms/step  ({placement})", flush=True)
    return row


def _accelerate_split(model, devices):
    from accelerate import dispatch_model

    half = len(model.blocks) // 2
    i0, i1 = (d.index if d.type == "cuda" else "cpu" for d in devices)
    device_map = {"patch_embed": i0, "time_embed": i0, "final_layer": i1}
    for i in range(len(model.blocks)):
        device_map[f"blocks.{i}"] = i0 if i < half else i1
    return dispatch_model(model, device_map=device_map, main_device=i0)


def run_demo(args) -> dict:
    import_package()
    from comfyui_headroom.demo.model import SIZES
    from comfyui_headroom.demo.run import (
        default_cache_dir,
        ensure_checkpoint,
        ensure_int8,
        load_bf16_model,
        load_int8_model,
    )
    from comfyui_headroom.demo.sampling import initial_noise
    from comfyui_headroom.memory import enable_multi_device

    devices = _devices(args.devices)
    d0 = devices[0]
    cfg = SIZES[args.size].with_tokens(args.tokens)
    folder = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    ckpt, _ = ensure_checkpoint(args.size, cfg, args.seed, folder)
    int8_path, _, _ = ensure_int8(ckpt, "rowwise")
    noise = initial_noise(cfg.latent_channels, cfg.latent_size, args.seed + 1000)
    rows, errors = [], {}

    model = load_bf16_model(ckpt, cfg, "cpu").to(d0)
    rows.append(_measure_demo("bf16 one GPU", model, noise, args.steps, devices, f"all on {d0}"))
    ref = rows[0]["latent"]
    del model
    _free()

    def bf16_split():
        model = load_bf16_model(ckpt, cfg, "cpu")
        split = enable_multi_device(model, devices)
        text = f"{len(split.blocks_on(0))} blocks on {devices[0]}, {len(split.blocks_on(1))} on {devices[1]}"
        return _measure_demo("bf16 split 50/50", model, noise, args.steps, devices, text, ref, same_as=ref)

    int8_one = {}

    def int8_one_gpu():
        model = load_int8_model(int8_path, cfg)[0].to(d0)
        row = _measure_demo("INT8 one GPU", model, noise, args.steps, devices, f"all on {d0}", ref)
        int8_one["latent"] = row["latent"]
        return row

    def int8_split():
        model = load_int8_model(int8_path, cfg)[0]
        split = enable_multi_device(model, devices)
        text = f"{len(split.blocks_on(0))} blocks on {devices[0]}, {len(split.blocks_on(1))} on {devices[1]}"
        return _measure_demo("INT8 split 50/50", model, noise, args.steps, devices, text, ref,
                             same_as=int8_one.get("latent"))

    def int8_split_streamed():
        """Budgets that hold all but 3 blocks: the last 3 stream from pinned RAM onto the second GPU through a
        ring of 2 slots, so they are copied in every step (the 1b model: 2 + 1 resident, 3 streamed)."""
        from comfyui_headroom.memory import module_bytes
        from comfyui_headroom.memory.planner import plan_placement

        model = load_int8_model(int8_path, cfg)[0]
        block = max(module_bytes(b) for b in model.blocks)
        rest = module_bytes(model) - sum(module_bytes(b) for b in model.blocks)
        resident = max(1, cfg.depth - 3)
        first = (resident + 1) // 2
        budgets = [int(rest + (first + 0.5) * block), int(rest + (resident - first + 2.5) * block)]
        if devices[0] == devices[1]:  # the cpu,cpu smoke test: the planner keys budgets by device name
            budgets = [max(budgets)] * 2
        plan = plan_placement(model, budgets, blocks_resident=resident, prefetch=1, devices=[str(d) for d in devices])
        split = enable_multi_device(model, plan)
        text = (", ".join(f"{len(plan.resident_blocks(str(d)))} resident on {d}" for d in devices)
                + f", {len(plan.streamed)} streamed onto {plan.stream_device} (ring of {plan.ring_slots})")
        copies = split.streamer.stats.copies
        row = _measure_demo("INT8 split + streaming", model, noise, args.steps, devices, text, ref,
                            same_as=int8_one.get("latent"))
        row["copies_per_step"] = (split.streamer.stats.copies - copies) / (args.steps + 1)
        return row

    def accelerate_split():
        model = _accelerate_split(load_bf16_model(ckpt, cfg, "cpu"), devices)
        return _measure_demo("bf16 accelerate device_map", model, noise, args.steps, devices,
                             "same split, accelerate dispatch_model", ref, same_as=ref)

    for name, fn in (("bf16 split 50/50", bf16_split), ("INT8 one GPU", int8_one_gpu),
                     ("INT8 split 50/50", int8_split), ("INT8 split + streaming", int8_split_streamed),
                     ("bf16 accelerate device_map", accelerate_split)):
        if name == "bf16 accelerate device_map" and d0.type != "cuda":
            continue
        try:
            rows.append(fn())
        except Exception as err:  # one failed run must not hide the others' numbers
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"{name} failed: {errors[name]}", file=sys.stderr, flush=True)
        _free()
    for row in rows:
        row.pop("latent")
    by = {r["run"]: r for r in rows}

    def overhead(split: str, one: str):
        return by[split]["step_ms"] / by[one]["step_ms"] - 1 if split in by and one in by else None

    result = {
        "bench": "demo",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": _gpu_name(devices), "versions": versions("triton", "accelerate", "transformers"),
        "command": "python bench/multi_gpu.py " + " ".join(sys.argv[1:]),
        "model": {"size": args.size, "parameters": cfg.parameter_count(), "depth": cfg.depth, "hidden": cfg.hidden,
                  "tokens": cfg.tokens},
        "steps": args.steps, "rows": rows, "errors": errors,
        "overhead_bf16": overhead("bf16 split 50/50", "bf16 one GPU"),
        "overhead_int8": overhead("INT8 split 50/50", "INT8 one GPU"),
        "overhead_accelerate": overhead("bf16 accelerate device_map", "bf16 one GPU"),
    }
    b, i = by.get("bf16 split 50/50"), by.get("INT8 split 50/50")
    result["goals"] = {
        "bf16_split_bitwise": None if b is None else b["bitwise_equal_one_gpu"],
        "int8_split_within_bound": None if i is None else (i.get("cosine_vs_bf16", 0) >= GOAL_COSINE
                                                           and i.get("max_abs_diff_vs_one_gpu", 1) == 0.0),
        "overhead_le_10pct": None if result["overhead_bf16"] is None or result["overhead_int8"] is None else
        max(result["overhead_bf16"], result["overhead_int8"]) <= GOAL_OVERHEAD,
    }
    return result


# ------------------------------------------------------------------------------------------------ comfy


def run_comfy(args) -> dict:
    devices = _devices(args.devices)
    sys.path.insert(0, args.comfy)
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy.cli_args

    comfy.cli_args.args.cpu = devices[0].type != "cuda"
    import comfy.sd
    from safetensors.torch import save_file

    import_package()
    from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
    from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig
    from comfyui_headroom.memory import enable_multi_device
    from comfyui_models import flux_layout

    layout = flux_layout(hidden=args.hidden, depth=args.depth, single=args.single, context=4096)
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.ones(s) if std is None else torch.randn(s, generator=gen) * std).to(torch.bfloat16)
          for k, s, std in layout}
    path = "/tmp/headroom_flux_multi_gpu.safetensors"
    save_file(sd, path)
    del sd
    g = torch.Generator().manual_seed(1)
    side = int(math.isqrt(args.tokens)) * 2
    inputs = dict(x=torch.randn(1, 16, side, side, generator=g), timestep=torch.tensor([0.7]),
                  context=torch.randn(1, args.txt, 4096, generator=g), y=torch.randn(1, 768, generator=g))
    rows, errors = [], {}

    def call(dm, dtype):
        d0 = devices[0]
        with torch.no_grad():
            out = dm(inputs["x"].to(d0, dtype), inputs["timestep"].to(d0), context=inputs["context"].to(d0, dtype),
                     y=inputs["y"].to(d0, dtype))
        _sync(devices)
        return out.float().cpu()

    def timed(dm, dtype):
        out = call(dm, dtype)  # warm-up
        _reset_peaks(devices)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = call(dm, dtype)
        return out, (time.perf_counter() - t0) / args.iters * 1e3

    for label, load in (("ComfyUI stock bf16", lambda: comfy.sd.load_diffusion_model(path)),
                        ("headroom INT8", lambda: load_int8_diffusion_model(path, Int8LoadConfig())[0])):
        try:
            patcher = load()
            dm = patcher.model.diffusion_model
            dtype = patcher.model.get_dtype_inference()
            dm.to(devices[0])
            one, one_ms = timed(dm, dtype)
            split = enable_multi_device(dm, devices, blocks=["double_blocks", "single_blocks"])
            two, two_ms = timed(dm, dtype)
            split.disable()
            rows.append({"run": label, "step_ms_one_gpu": one_ms, "step_ms_split": two_ms,
                         "overhead": two_ms / one_ms - 1, "bitwise_equal": bool(torch.equal(one, two)),
                         "max_abs_diff": float((one - two).abs().max()), "peak_vram_gb": _peaks(devices)})
            print(json.dumps(rows[-1]), flush=True)
            del patcher, dm
        except Exception as err:
            errors[label] = f"{type(err).__name__}: {err}"
            print(f"{label} failed: {errors[label]}", file=sys.stderr, flush=True)
        _free()
    try:
        sampler_row = _comfy_sampler_split(path, devices, args, inputs)
        rows.append(sampler_row)
        print(json.dumps(sampler_row), flush=True)
    except Exception as err:
        errors["sampler"] = f"{type(err).__name__}: {err}"
        print(f"sampler run failed: {errors['sampler']}", file=sys.stderr, flush=True)
    return {"bench": "comfy", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "gpu": _gpu_name(devices), "versions": versions("triton", "accelerate", "transformers"),
            "command": "python bench/multi_gpu.py " + " ".join(sys.argv[1:]),
            "model": {"hidden": args.hidden, "double": args.depth, "single": args.single, "tokens": args.tokens},
            "rows": rows, "errors": errors}


def _comfy_sampler_split(path, devices, args, inputs) -> dict:
    """The loader's ``devices`` inside ComfyUI: ``load_models_gpu`` places the split (Int8ModelPatcher.load_split)
    and ``comfy.sample.sample`` runs Euler steps through ComfyUI's sampler, against the same sampling of the model
    loaded for one GPU. Times the whole sampling call (steps + ComfyUI's own work)."""
    import comfy.model_management
    import comfy.sample
    from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
    from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig

    steps = 4
    latent = torch.zeros(1, 16, inputs["x"].shape[2], inputs["x"].shape[3])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    pooled = inputs["y"]
    positive = [[inputs["context"], {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(inputs["context"]), {"pooled_output": torch.zeros_like(pooled)}]]

    def sample(patcher):
        out = comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive, negative, latent, seed=0)
        _sync(devices)
        t0 = time.perf_counter()
        out = comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive, negative, latent, seed=0)
        _sync(devices)
        return out.float().cpu(), (time.perf_counter() - t0) / steps * 1e3

    one_gpu = load_int8_diffusion_model(path, Int8LoadConfig())[0]
    one, one_ms = sample(one_gpu)
    comfy.model_management.unload_all_models()
    del one_gpu
    _free()
    split = load_int8_diffusion_model(path, Int8LoadConfig(), devices=[str(d) for d in devices])[0]
    comfy.model_management.load_models_gpu([split])
    dm = split.model.diffusion_model
    placed = sorted({str(p.device) for b in (*dm.double_blocks, *dm.single_blocks) for p in b.parameters()})
    _reset_peaks(devices)
    two, two_ms = sample(split)
    comfy.model_management.unload_all_models()
    return {"run": "headroom INT8, loader devices input, ComfyUI sampler (ms per step)", "step_ms_one_gpu": one_ms,
            "step_ms_split": two_ms, "overhead": two_ms / one_ms - 1, "bitwise_equal": bool(torch.equal(one, two)),
            "max_abs_diff": float((one - two).abs().max()), "blocks_on": placed, "peak_vram_gb": _peaks(devices)}


# ------------------------------------------------------------------------------------------------ write


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        v = r["versions"]
        lines += [f"{r['gpu']}, torch {v['torch']} (CUDA {v['cuda']}); {r['date']}; `{r['command']}`.", ""]
        if r["bench"] == "demo":
            m = r["model"]
            lines += [f"Demo `{m['size']}` DiT ({m['parameters'] / 1e9:.2f} B parameters, {m['depth']} blocks) at "
                      f"{m['tokens']} tokens, {r['steps']} Euler steps; median step, both GPUs synchronised per step.",
                      "", "| run | placement | step (ms) | vs one GPU | equal to one GPU | cosine vs bf16 | peak VRAM (GB) |",
                      "|---|---|---|---|---|---|---|"]
            base = {row["run"]: row["step_ms"] for row in r["rows"]}
            for row in r["rows"]:
                one = base.get("INT8 one GPU" if row["run"].startswith("INT8") else "bf16 one GPU")
                eq = ("bitwise" if row.get("bitwise_equal_one_gpu") else f"max diff {row['max_abs_diff_vs_one_gpu']:.3g}") \
                    if "max_abs_diff_vs_one_gpu" in row else "(reference)"
                cos = f"{row['cosine_vs_bf16']:.6f}" if "cosine_vs_bf16" in row else "(reference)"
                peaks = ", ".join(f"{k} {g:.2f}" for k, g in row["peak_vram_gb"].items()) or "-"
                placement = row["placement"] + (f"; {row['copies_per_step']:.1f} block copies per step"
                                                 if "copies_per_step" in row else "")
                lines.append(f"| {row['run']} | {placement} | {row['step_ms']:.2f} | "
                             f"{row['step_ms'] / one:.3f}x | {eq} | {cos} | {peaks} |")
            ok = {True: "met", False: "NOT met", None: "not measured"}
            lines += ["", f"- Goals: bf16 split bitwise {ok[r['goals']['bf16_split_bitwise']]}; INT8 split within the "
                      f"INT8 bound {ok[r['goals']['int8_split_within_bound']]}; step-time overhead <= 10 % "
                      f"{ok[r['goals']['overhead_le_10pct']]}."]
        else:
            lines += ["| model | one GPU (ms) | split (ms) | overhead | equal |", "|---|---|---|---|---|"]
            for row in r["rows"]:
                eq = "bitwise" if row["bitwise_equal"] else f"max diff {row['max_abs_diff']:.3g}"
                lines.append(f"| {row['run']} | {row['step_ms_one_gpu']:.2f} | {row['step_ms_split']:.2f} | "
                             f"{row['overhead'] * 100:+.1f} % | {eq} |")
        lines += [f"- {name}: failed ({err})." for name, err in r.get("errors", {}).items()] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser("demo")
    add_demo_model_args(p_demo)
    p_comfy = sub.add_parser("comfy")
    p_comfy.add_argument("--comfy", required=True, help="an extracted ComfyUI v0.29")
    p_comfy.add_argument("--hidden", type=int, default=3072)
    p_comfy.add_argument("--depth", type=int, default=2)
    p_comfy.add_argument("--single", type=int, default=4)
    p_comfy.add_argument("--tokens", type=int, default=4096)
    p_comfy.add_argument("--txt", type=int, default=256)
    p_comfy.add_argument("--iters", type=int, default=8)
    for p in (p_demo, p_comfy):
        p.add_argument("--devices", default="cuda:0,cuda:1", help="two devices; cpu,cpu only smoke-tests")
        p.add_argument("--json", help="write the result here")
    p_write = sub.add_parser("write")
    p_write.add_argument("results", nargs="+")
    p_write.add_argument("--doc", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = parser.parse_args(argv)
    if args.cmd == "write":
        write_section("Multi-GPU", render([json.loads(Path(p).read_text()) for p in args.results]), Path(args.doc))
        print(f"wrote the Multi-GPU section of {args.doc}")
        return 0
    result = run_demo(args) if args.cmd == "demo" else run_comfy(args)
    emit(result, args.json)
    print(render([result]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
