"""ComfyUI-native road on a GPU: load time, step time and peak VRAM of a wide Flux in ComfyUI.

Runs inside ComfyUI's own code (in process, no server): a random Flux.1 of ``--hidden`` (>= 3072) is written
as bf16, then loaded by ComfyUI's stock loader (bf16), by ours (quantize while loading), and - when
comfy-kitchen is importable - ComfyUI's own INT8 (``int8_tensorwise`` per-channel file written with
comfy-kitchen). Each model is moved to the GPU by ComfyUI's ``load_models_gpu`` and its diffusion model is
called on a 1024x1024-sized latent (``--tokens`` image tokens). Also checks on the GPU that partial loading
(``gpu_budget_gb``), block streaming (``blocks_resident``), two models sharing the GPU and a LoRA give the
same outputs as the resident INT8 model.

    python bench/comfy_native.py --comfy /path/to/comfyui --out results/   [--cpu --hidden 1024 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--txt", type=int, default=256)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, args.comfy)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    import comfy.model_management as mm
    import comfy.sd
    import torch
    from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
    from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig
    from comfyui_headroom.kernels.dispatch import force_kernel, kernel_summary, reset_kernel_stats
    from comfyui_headroom.quant.linear import int8_layers
    from comfyui_models import flux_layout, flux_lora_state_dict
    from safetensors.torch import save_file

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": [], "checks": {}}
    os.makedirs(args.out, exist_ok=True)

    # -- the checkpoint ------------------------------------------------------------------------------------
    layout = flux_layout(hidden=args.hidden, depth=args.depth, single=args.single, context=4096)
    gen = torch.Generator(device=dev).manual_seed(0)
    sd = {}
    for key, shape, std in layout:
        t = torch.ones(shape, device=dev) if std is None else torch.randn(shape, generator=gen, device=dev) * std
        sd[key] = t.to(torch.bfloat16).cpu()
    path = "/tmp/headroom_flux_wide.safetensors"
    save_file(sd, path)
    params = sum(math.prod(s) for _, s, _ in layout)
    results["model"] = {"hidden": args.hidden, "double": args.depth, "single": args.single,
                        "params": params, "bf16_gb": params * 2 / 2**30}
    kitchen_path = None
    try:
        from comfy_fused import kitchen_file  # ComfyUI's own INT8 layout, written with comfy-kitchen

        kitchen_path = kitchen_file(sd, "/tmp/headroom_flux_wide_kitchen_int8.safetensors", dev)
    except Exception as err:  # comfy-kitchen missing on this machine
        results["checks"]["comfy_kitchen"] = f"not available: {type(err).__name__}: {err}"
    lora_sd = flux_lora_state_dict(sd, rank=16, std=0.05)
    del sd

    g = torch.Generator(device=dev).manual_seed(1)
    side = int(math.isqrt(args.tokens)) * 2
    x = torch.randn(1, 16, side, side, generator=g, device=dev)
    inputs = dict(x=x, timestep=torch.tensor([0.7], device=dev),
                  context=torch.randn(1, args.txt, 4096, generator=g, device=dev),
                  y=torch.randn(1, 768, generator=g, device=dev))

    def forward(patcher):
        dtype = patcher.model.get_dtype_inference()
        with torch.no_grad():
            return patcher.model.diffusion_model(inputs["x"].to(dtype), inputs["timestep"],
                                                 context=inputs["context"].to(dtype), y=inputs["y"].to(dtype)).float()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed_steps(patcher):
        for _ in range(2):
            out = forward(patcher)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = forward(patcher)
        sync()
        step = (time.perf_counter() - t0) / args.iters
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        return out, step, peak

    def measure(name, load_fn, keep=False):
        mm.unload_all_models()
        mm.soft_empty_cache()
        sync()
        t0 = time.perf_counter()
        patcher = load_fn()
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        mm.load_models_gpu([patcher])
        sync()
        to_gpu_s = time.perf_counter() - t1
        reset_kernel_stats()
        out, step, peak = timed_steps(patcher)
        row = {"variant": name, "load_s": round(load_s, 2), "to_gpu_s": round(to_gpu_s, 2),
               "step_ms": round(step * 1000, 2), "peak_vram_gb": round(peak, 2),
               "kernels": {k: v["calls"] for k, v in kernel_summary().items()}}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        return (patcher, out) if keep else (None, out)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    _, ref = measure("ComfyUI stock bf16 (UNETLoader)", lambda: comfy.sd.load_diffusion_model(path))
    if kitchen_path:
        _, kout = measure("ComfyUI INT8 (comfy-kitchen int8_tensorwise)", lambda: comfy.sd.load_diffusion_model(kitchen_path))
        results["checks"]["comfy_int8_rel_err_vs_bf16"] = rel(kout, ref)
    ours, out = measure("headroom INT8 (quantize on load, compute auto)",
                        lambda: load_int8_diffusion_model(path, Int8LoadConfig())[0], keep=True)
    results["checks"]["headroom_rel_err_vs_bf16"] = rel(out, ref)
    results["checks"]["int8_layers"] = len(int8_layers(ours.model))
    if cuda:
        for kernel in ("int_mm", "w8a16"):
            try:
                with force_kernel(kernel):
                    _, k_out = measure(f"headroom INT8, compute {kernel}", lambda: ours)
                results["checks"][f"{kernel}_rel_err_vs_auto"] = rel(k_out, out)
            except Exception as err:
                results["checks"][f"{kernel}"] = f"failed: {type(err).__name__}: {err}"

    # partial loading (ComfyUI's low-VRAM path) under a 1 GB weight budget
    budget = load_int8_diffusion_model(path, Int8LoadConfig(), budget_bytes=2**30)[0]
    _, b_out = measure("headroom INT8, gpu_budget_gb=1 (ComfyUI partial loading)", lambda: budget)
    results["checks"]["budget_rel_err_vs_resident"] = rel(b_out, out)
    del budget
    streamed = load_int8_diffusion_model(path, Int8LoadConfig(), blocks_resident=2)[0]
    _, s_out = measure("headroom INT8, blocks_resident=2 (block streaming)", lambda: streamed)
    results["checks"]["streaming_rel_err_vs_resident"] = rel(s_out, out)
    mm.unload_all_models()
    del streamed

    # two models on the GPU at once, then a LoRA on both roads
    stock = comfy.sd.load_diffusion_model(path)
    mine = load_int8_diffusion_model(path, Int8LoadConfig())[0]
    mm.load_models_gpu([stock, mine])
    results["checks"]["two_models_loaded"] = len(mm.current_loaded_models)
    results["checks"]["two_models_rel_err"] = rel(forward(mine), out)
    stock_l, _ = comfy.sd.load_lora_for_models(stock, None, lora_sd, 1.0, 0)
    mine_l, _ = comfy.sd.load_lora_for_models(mine, None, lora_sd, 1.0, 0)
    mm.load_models_gpu([stock_l])
    a = forward(stock_l)
    mm.load_models_gpu([mine_l])
    b = forward(mine_l)
    results["checks"]["lora_effect_vs_bf16"] = rel(a, ref)
    results["checks"]["lora_int8_vs_bf16_lora"] = rel(b, a)
    with open(os.path.join(args.out, "comfy_native.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results["checks"]), flush=True)


if __name__ == "__main__":
    main()
