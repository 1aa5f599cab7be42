"""ComfyUI's own models at real widths: stock bf16 vs ComfyUI's INT8 vs ours unfused vs ours with fused blocks (#18).

For each family a random model of ComfyUI's class at the release's width (few blocks) is written as bf16, found by
ComfyUI's model detection and loaded four ways in one process: ComfyUI's UNETLoader (bf16), ComfyUI's own INT8
(an ``int8_tensorwise`` per-channel file written with comfy-kitchen, when importable), ours with
``fuse_blocks="off"`` and ours fused (``auto``). Per variant: median step time (CUDA events), peak VRAM and the
share of the step spent in ComfyUI's attention function (timed through its ``optimized_attention_override``
hook); cosine of fused vs unfused INT8 and of each INT8 vs bf16.

    python bench/comfy_fused.py --comfy /path/to/comfyui --out OUT [--models flux,qwen_image,flux2,wan]
        [--doc docs/PERFORMANCE.md]          # writes the "ComfyUI's models, fused INT8 blocks" section
    python bench/comfy_fused.py --comfy DIR --out OUT --cpu --small --models flux,wan --fuse on --min-features 64
        # smoke test of the script on a CPU (detection fixes Qwen-Image's and Flux 2's head counts: real widths only)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

TITLE = "ComfyUI's models, fused INT8 blocks"


def families(small: bool, scale: int = 1) -> dict:
    """name -> (ComfyUI class path, constructor kwargs, input builder(dev, dtype) -> (args, kwargs)); ``scale``
    multiplies the block counts (the releases have 10-20x more: there the embedders and the final layer weigh less)."""
    import torch

    def flux_inputs(channels, side, ctx_dim, txt, patch=2, pooled=True, frames=None):
        def make(dev, dtype):
            g = torch.Generator(device=dev).manual_seed(1)
            kwargs = {"context": torch.randn(1, txt, ctx_dim, generator=g, device=dev, dtype=dtype)}
            if pooled:
                kwargs["y"] = torch.randn(1, 768, generator=g, device=dev, dtype=dtype)
            frame_dims = () if frames is None else (frames,)  # Qwen-Image takes video-shaped latents [b, c, t, h, w]
            x = torch.randn(1, channels, *frame_dims, side * patch, side * patch, generator=g, device=dev, dtype=dtype)
            return (x, torch.tensor([0.7], device=dev)), kwargs
        return make

    def wan_inputs(frames, h, w, txt, ctx_dim):
        def make(dev, dtype):
            g = torch.Generator(device=dev).manual_seed(1)
            x = torch.randn(1, 16, frames, h, w, generator=g, device=dev, dtype=dtype)
            return (x, torch.tensor([0.7], device=dev)), {
                "context": torch.randn(1, txt, ctx_dim, generator=g, device=dev, dtype=dtype)}
        return make

    side = 8 if small else 64  # 64 x 64 patches = 4096 image tokens
    hidden = 256 if small else 3072
    heads = hidden // 128 if not small else 2
    return {
        "flux": ("comfy.ldm.flux.model:Flux", dict(
            in_channels=16, out_channels=16, patch_size=2, txt_ids_dims=[], vec_in_dim=768, context_in_dim=4096, hidden_size=hidden,
            mlp_ratio=4.0, num_heads=heads, depth=2 * scale, depth_single_blocks=4 * scale, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=False),
            flux_inputs(16, side, 4096, 256)),
        "qwen_image": ("comfy.ldm.qwen_image.model:QwenImageTransformer2DModel", dict(
            num_layers=4 * scale, attention_head_dim=128, num_attention_heads=heads,
            joint_attention_dim=3584 if not small else 512), flux_inputs(16, side, 3584 if not small else 512, 256,
                                                                        pooled=False, frames=1)),
        "flux2": ("comfy.ldm.flux.model:Flux", dict(
            image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
            context_in_dim=15360 if not small else 512, hidden_size=6144 if not small else 256, mlp_ratio=3.0,
            num_heads=48 if not small else 2, depth=2 * scale, depth_single_blocks=4 * scale, axes_dim=[32, 32, 32, 32],
            theta=2000, qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True,
            ops_bias=False, txt_ids_dims=[3], patch_size=1),
            flux_inputs(128, side, 15360 if not small else 512, 256, patch=1, pooled=False)),
        "wan": ("comfy.ldm.wan.model:WanModel", dict(
            dim=5120 if not small else 256, ffn_dim=13824 if not small else 512, num_heads=40 if not small else 2,
            num_layers=4 * scale, text_dim=4096, in_dim=16, out_dim=16, freq_dim=256),
            wan_inputs(9 if not small else 1, 60 if not small else 8, 104 if not small else 8, 512, 4096)),
    }


def random_state_dict(class_path: str, kwargs: dict, dev) -> dict:
    """The class's state dict with seeded random bf16 weights (norm weights 1), built on meta then filled on dev."""
    import importlib

    import comfy.ops
    import torch

    module, name = class_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    model = cls(**kwargs, device="meta", dtype=torch.bfloat16, operations=comfy.ops.manual_cast)
    g = torch.Generator(device=dev).manual_seed(0)
    out = {}
    for key, t in model.state_dict().items():
        if t.ndim == 1 and "norm" in key:
            value = torch.ones(t.shape, device=dev)
        else:
            value = torch.randn(t.shape, generator=g, device=dev) * (0.02 if t.ndim >= 2 else 0.01)
        out[key] = value.to(torch.bfloat16).cpu()
    return out


def kitchen_file(sd: dict, path: str, dev) -> str:
    """ComfyUI's own INT8 layout (per-channel ``int8_tensorwise``) for the layers ComfyUI would quantize."""
    import torch
    from comfy_kitchen.tensor import QuantizedTensor
    from comfyui_headroom.integrations.comfyui.ops import NATIVE_SKIP_PATTERNS
    from safetensors.torch import save_file

    out = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2 and min(value.shape) >= 1024 and \
                not any(p in key for p in NATIVE_SKIP_PATTERNS):
            qt = QuantizedTensor.from_float(value.to(dev), "TensorWiseINT8Layout", per_channel=True)
            out.update({k: v.cpu() for k, v in qt.state_dict(key).items()})
            out[key[:-len("weight")] + "comfy_quant"] = torch.tensor(
                list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
        else:
            out[key] = value
    save_file(out, path)
    return path


def measure(patcher, make_inputs, iters: int, cuda: bool, profile: bool = False) -> dict:
    """Median step (ms), peak VRAM (GB), attention share, and the output of one step."""
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    mm.soft_empty_cache()
    mm.load_models_gpu([patcher])
    dev = mm.get_torch_device()
    dtype = patcher.model.get_dtype_inference()
    args, kwargs = make_inputs(dev, dtype)
    attention_events: list = []

    def timed_attention(func, *a, **kw):
        if not cuda:
            return func(*a, **kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = func(*a, **kw)
        end.record()
        attention_events.append((start, end))
        return out

    def step():
        with torch.no_grad():
            return patcher.model.diffusion_model(*args, transformer_options={
                "optimized_attention_override": timed_attention}, **kwargs)

    for _ in range(2):
        out = step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps, shares = [], []
    for _ in range(iters):
        attention_events.clear()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = step()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            total = start.elapsed_time(end)
            steps.append(total)
            shares.append(sum(a.elapsed_time(b) for a, b in attention_events) / total)
    result = {"step_ms": round(statistics.median(steps), 3) if steps else None,
              "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
              "attention_share": round(statistics.median(shares), 3) if shares else None,
              "output": out.float().cpu()}
    if profile and cuda:
        result["kernels"] = top_kernels(step)
    return result


def top_kernels(step, calls: int = 3, top: int = 15) -> list:
    """The GPU kernels of ``calls`` steps under torch.profiler, most time first: ``[name, ms per step, count per
    step]`` for the ``top`` ones and the rest summed (where a variant's step time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    rows = [[e.key[:90], round(e.device_time_total / 1000 / calls, 3), e.count // calls] for e in events[:top]]
    rest = sum(e.device_time_total for e in events[top:]) / 1000 / calls
    return rows + [["(all other kernels)", round(rest, 3), sum(e.count for e in events[top:]) // calls]]


def run_family(name, spec, args, cuda, dev) -> dict:
    import comfy.sd
    import torch
    from comfyui_headroom.integrations.comfyui.fused import fused_stats
    from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
    from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig
    from safetensors.torch import save_file

    class_path, kwargs, make_inputs = spec
    sd = random_state_dict(class_path, kwargs, dev)
    path = os.path.join(args.out, f"{name}_bf16.safetensors")
    save_file(sd, path)
    variants = {"ComfyUI bf16": lambda: comfy.sd.load_diffusion_model(path)}
    try:
        kitchen = kitchen_file(sd, os.path.join(args.out, f"{name}_kitchen.safetensors"), dev)
        variants["ComfyUI INT8 (comfy-kitchen)"] = lambda: comfy.sd.load_diffusion_model(kitchen)
    except Exception as err:  # comfy-kitchen missing here
        print(f"{name}: ComfyUI INT8 skipped ({type(err).__name__}: {err})", flush=True)
    del sd
    config = dict(min_features=args.min_features)
    variants["headroom INT8 unfused"] = lambda: load_int8_diffusion_model(path, Int8LoadConfig(
        fuse_blocks="off", **config))[0]
    variants["headroom INT8 fused"] = lambda: load_int8_diffusion_model(path, Int8LoadConfig(
        fuse_blocks=args.fuse, **config))[0]
    rows, outputs = [], {}
    for variant, load in variants.items():
        patcher = load()
        result = measure(patcher, make_inputs, args.iters, cuda, args.profile)
        outputs[variant] = result.pop("output")
        if variant.startswith("headroom"):
            result["fused"] = fused_stats(patcher.model.diffusion_model)
        rows.append({"variant": variant, **result})
        print(name, json.dumps(rows[-1]), flush=True)
        del patcher
    cos = lambda a, b: round(float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                                          dim=0)), 6)
    ref = outputs["ComfyUI bf16"]
    checks = {f"cos {v} vs bf16": cos(o, ref) for v, o in outputs.items() if v != "ComfyUI bf16"}
    checks["cos fused vs unfused"] = cos(outputs["headroom INT8 fused"], outputs["headroom INT8 unfused"])
    os.remove(path)
    return {"rows": rows, "checks": checks}


def render(result: dict) -> str:
    lines = [f"`{result['command']}` on {result['device']}, {result['date']}; {result['versions']}.", "",
             f"Random weights at the release's widths, {result.get('depth_scale', 1)}x the bench's few blocks "
             "(Flux 2+4, Qwen-Image 4, Flux 2 2+4, Wan 4); median step over "
             f"{result['iters']} calls. Ratios are bf16 step / variant step.", ""]
    for name, fam in result["families"].items():
        base = next(r["step_ms"] for r in fam["rows"] if r["variant"] == "ComfyUI bf16")
        lines += [f"### {name}", "", "| variant | step ms | × bf16 | peak VRAM GB | attention share | fused calls |",
                  "|---|---|---|---|---|---|"]
        for r in fam["rows"]:
            ratio = f"{base / r['step_ms']:.2f}" if base and r["step_ms"] else "n/a"
            fused = r.get("fused", {}).get("fused_calls", "")
            lines.append(f"| {r['variant']} | {r['step_ms']} | {ratio} | {r['peak_vram_gb']} | "
                         f"{r['attention_share']} | {fused} |")
        lines += ["", "; ".join(f"{k}: {v}" for k, v in fam["checks"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="flux,qwen_image,flux2,wan")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--fuse", default="auto", choices=("auto", "on"))
    ap.add_argument("--min-features", type=int, default=1024)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny widths (a smoke test of the script)")
    ap.add_argument("--depth-scale", type=int, default=1,
                    help="multiply the block counts (Flux 2+4, Qwen-Image 4, Flux 2 2+4, Wan 4) by this; the bf16 and "
                         "comfy-kitchen files of the largest family take ~16 GB x scale of disk")
    ap.add_argument("--profile", action="store_true", help="also list each variant's top GPU kernels (torch.profiler)")
    ap.add_argument("--doc", default=None, help="write the section into this PERFORMANCE.md")
    args = ap.parse_args()
    sys.path.insert(0, args.comfy)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.cpu
    import comfy.model_management as mm
    import torch
    from benchlib import versions, write_section

    os.makedirs(args.out, exist_ok=True)
    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    table = families(args.small, args.depth_scale)
    result = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "date": datetime.date.today().isoformat(), "versions": versions("torch", "triton"),
              "command": "python bench/comfy_fused.py " + " ".join(sys.argv[1:]), "iters": args.iters,
              "depth_scale": args.depth_scale,
              "families": {}}
    for name in args.models.split(","):
        result["families"][name] = run_family(name, table[name], args, cuda, dev)
    with open(os.path.join(args.out, "comfy_fused.json"), "w") as f:
        json.dump(result, f, indent=1)
    if args.doc:
        write_section(TITLE, render(result), Path(args.doc))
    print(render(result))


if __name__ == "__main__":
    main()
