"""Where one forward of the demo DiT spends its GPU time: bf16, INT8 with plain layers, INT8 fed by producers.

    python bench/profile_demo.py [--size 1b] [--tokens 4096] [--json OUT.json]

One process, one model (random weights from the demo's seeded init, built directly on the GPU: no files), one
latent. Per variant: the median forward time (CUDA events, 20 calls, each synchronised), and one forward under
``torch.profiler`` with every kernel's GPU time summed into groups - INT8 GEMM, cuBLAS GEMM, attention, norms,
quantization + producers, other elementwise/copies - plus how long the GPU sat idle between kernels in that
forward (time the host took to issue work, and launch gaps). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path

import torch

from benchlib import import_package, versions

GROUPS = (  # (group, substrings of kernel names), first match wins
    ("INT8 GEMM", ("_w8a8", "_w8a16")),
    ("INT8 quantization + producers", ("_quantize", "_norm_modulate")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("cuBLAS GEMM", ("nvjet", "gemm", "cutlass", "splitkreduce")),
    ("norms", ("layer_norm", "rms_norm")),
)


def group_of(kernel: str) -> str:
    name = kernel.lower()
    return next((group for group, keys in GROUPS if any(k in name for k in keys)), "other elementwise + copies")


def forward_ms(model, latent, t, calls: int = 20) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(latent, t)
        torch.cuda.synchronize()
        times = []
        for _ in range(calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(latent, t)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernel_profile(model, latent, t) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(latent, t)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(latent, t)
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    groups: dict[str, float] = {}
    for e in kernels:
        group = group_of(e.name)
        groups[group] = groups.get(group, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e3
    busy = sum(groups.values())
    return {"kernels": len(kernels), "gpu_busy_ms": busy, "span_ms": span, "idle_ms": span - busy,
            "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}


def run(args) -> dict:
    import_package()
    from comfyui_headroom.demo.model import SIZES, DemoDiT, make_state_dict
    from comfyui_headroom.quant.replace import quantize_model

    cfg = SIZES[args.size].with_tokens(args.tokens)
    model = DemoDiT(cfg).to(torch.bfloat16)
    model.load_state_dict(make_state_dict(cfg, args.seed))
    model = model.cuda().eval()
    gen = torch.Generator().manual_seed(args.seed + 1000)
    latent = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen).cuda()
    t = torch.full((1,), 0.5, device="cuda")

    variants = {}
    variants["bf16"] = {"forward_ms": forward_ms(model, latent, t), **kernel_profile(model, latent, t)}
    int8 = copy.deepcopy(model)
    quantize_model(int8)
    int8.use_int8_producers(False)
    variants["INT8, plain layers"] = {"forward_ms": forward_ms(int8, latent, t), **kernel_profile(int8, latent, t)}
    int8.use_int8_producers(True)
    variants["INT8, producers"] = {"forward_ms": forward_ms(int8, latent, t), **kernel_profile(int8, latent, t)}
    base = variants["bf16"]["forward_ms"]
    for row in variants.values():
        row["speedup_vs_bf16"] = base / row["forward_ms"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(),
        "versions": versions("triton"),
        "command": "python bench/profile_demo.py " + " ".join(sys.argv[1:]),
        "model": {"size": args.size, "tokens": cfg.tokens, "hidden": cfg.hidden, "depth": cfg.depth},
        "variants": variants,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", choices=("tiny", "small", "1b"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_demo.py needs a CUDA GPU", file=sys.stderr)
        return 2
    text = json.dumps(run(args), indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
