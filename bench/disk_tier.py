"""Disk tier: the demo DiT in INT8 with RAM capped below its size - step time against its bound, peak RSS,
bit-for-bit equality with the resident run, and accelerate's disk offload on the same model and budget.

    python bench/disk_tier.py run --size 1b --depth 24 --ram-budget-gb 1.5 --json bench/results/disk_tier_h200.json
    python bench/disk_tier.py write bench/results/disk_tier_h200.json      # rewrites the PERFORMANCE.md section
    python bench/disk_tier.py run --device cpu --size tiny --steps 1 --ram-budget-gb 0.05   # smoke test only

bound = max(resident step, disk bytes per step / measured disk rate, PCIe bytes per step / pinned bandwidth);
goal: step / bound <= 1.10, peak RSS <= RAM budget + 1 GB, output equal to resident.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import demo_bench_main, import_package, versions

TITLE = "Disk tier (blocks streamed from the SSD)"


def _sample(model, noise, steps, device):
    from comfyui_headroom.demo.sampling import sample

    return sample(model, noise, steps, device, warmup=True)


def _accelerate_disk_offload(load, noise, steps, device) -> float | None:
    """accelerate's ``disk_offload`` (every weight memory-mapped from an offload folder, moved per module):
    median step seconds, or None when accelerate is not installed."""
    try:
        from accelerate import disk_offload
    except ImportError:
        return None
    model = load()
    # accelerate moves each weight in its module's pre-forward hook; the fused producers call the INT8 GEMMs
    # without going through the layer's __call__, so under its hooks the plain layer calls are used.
    model.use_int8_producers(False)
    with tempfile.TemporaryDirectory() as folder:
        disk_offload(model, folder, execution_device=device)
        step = _sample(model, noise, steps, device).step_time_s
    del model
    gc.collect()
    return step


def run(args) -> dict:
    import_package()
    from comfyui_headroom.demo.model import SIZES
    from comfyui_headroom.demo.run import (NOISE_SEED_OFFSET, default_cache_dir, ensure_checkpoint, ensure_int8,
                                           load_int8_model, place)
    from comfyui_headroom.demo.sampling import initial_noise
    from comfyui_headroom.memory import MemoryTracker
    from comfyui_headroom.memory.disk import file_pages_cached
    from comfyui_headroom.memory.doctor import disk_read_speed, pinned_h2d_speed
    from comfyui_headroom.units import GB

    device = torch.device(args.device)
    cfg = SIZES[args.size].with_tokens(args.tokens) if args.tokens else SIZES[args.size]
    label = args.size
    if args.depth:  # the same blocks, more of them: a model of a few GB for the RAM cap to bite on
        cfg, label = dataclasses.replace(cfg, depth=args.depth), f"{args.size}-depth{args.depth}"
    folder = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    src, _ = ensure_checkpoint(label, cfg, args.seed, folder)
    int8_path, _, _ = ensure_int8(src, "rowwise")
    noise = initial_noise(cfg.latent_channels, cfg.latent_size, args.seed + NOISE_SEED_OFFSET)
    disk = disk_read_speed(int8_path, int(args.read_test_gb * GB))
    pinned = pinned_h2d_speed() if device.type == "cuda" else None
    ram_budget = int(args.ram_budget_gb * GB)

    # 1. disk tier first, in a fresh process state: its peak RSS is what a user with that much RAM sees
    with MemoryTracker() as tracker:
        model, _, _ = load_int8_model(int8_path, cfg, lazy_blocks=True)
        placement = place(model, device, int(args.gpu_budget_gb * GB) if args.gpu_budget_gb else None,
                          blocks_resident=0 if args.gpu_budget_gb is None else None,
                          ram_budget_bytes=ram_budget, disk=int8_path)
        streamed = _sample(model, noise, args.steps, device)
        streamer = placement.streamer
        stats = streamer.disk_reader.stats if streamer and streamer.disk_reader else None
        disk_bytes = sum(streamer._streamed[i].layout.nbytes for i in streamer.disk_indices) if streamer else 0
        pcie_bytes = streamer.streamed_bytes if streamer else 0
        tiers = placement.tiers
    cached = file_pages_cached(int8_path)  # after the disk-tier run, before the resident load reads the whole file
    placement.release()
    del model
    gc.collect()

    # 2. resident reference: the whole INT8 model on the device
    model, _, _ = load_int8_model(int8_path, cfg)
    resident_placement = place(model, device)
    resident = _sample(model, noise, args.steps, device)
    resident_placement.release()
    del model
    gc.collect()

    # 3. accelerate's disk offload on the same file
    accel = None if args.no_accelerate else _accelerate_disk_offload(
        lambda: load_int8_model(int8_path, cfg)[0], noise, args.steps, device)

    rate = disk["gb_per_s"]
    parts = {"resident_s": resident.step_time_s,
             "disk_s": disk_bytes / GB / rate if rate else None,
             "pcie_s": pcie_bytes / GB / pinned if pinned else None}
    bound = max(v for v in parts.values() if v is not None)
    return {
        "versions": versions("safetensors", "accelerate"), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "size": label, "tokens": cfg.tokens, "steps": args.steps, "model_file_gb": int8_path.stat().st_size / GB,
        "ram_budget_gb": args.ram_budget_gb, "disk_test": disk, "pinned_gb_s": pinned, "tiers": tiers,
        "disk_bytes_per_step": disk_bytes, "pcie_bytes_per_step": pcie_bytes,
        "disk_read_gb_s_in_run": stats.gb_per_s if stats else None,
        "step_s": streamed.step_time_s, "bound_s": bound, "bound_parts_s": parts,
        "step_over_bound": streamed.step_time_s / bound if bound else None,
        "peak_rss_gb": tracker.report.peak_rss_bytes / GB,
        # the INT8 file's bytes in the OS page cache after the disk-tier run (posix_fadvise drops what it read)
        "page_cache_gb": None if cached is None else cached / GB,
        # RSS when the load began: the interpreter, torch, the CUDA context and the disk/PCIe tests' leftovers
        "start_rss_gb": tracker.report.start_rss_bytes / GB,
        "rss_within_budget_plus_1gb": tracker.report.peak_rss_bytes <= ram_budget + GB,
        "rss_growth_within_budget_plus_1gb":
            tracker.report.peak_rss_bytes - tracker.report.start_rss_bytes <= ram_budget + GB,
        "equal_to_resident": bool(torch.equal(streamed.latent, resident.latent)),
        "accelerate_disk_offload_step_s": accel,
        "accelerate_over_ours": accel / streamed.step_time_s if accel else None,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def render(r: dict) -> str:
    def num(v, fmt="{:.3f}"):
        return "n/a" if v is None else fmt.format(v)

    return "\n".join([
        f"Run {r['when']} on {r['gpu'] or r['device']}: demo `{r['size']}` INT8 ({num(r['model_file_gb'], '{:.2f}')} "
        f"GB file), {r['tokens']} tokens, RAM budget {r['ram_budget_gb']} GB; `bench/disk_tier.py`.",
        "",
        "| what | measured |",
        "|---|---|",
        f"| disk read (cold, {r['disk_test']['bytes'] / 2**20:.0f} MB) | {num(r['disk_test']['gb_per_s'], '{:.2f}')} GB/s |",
        f"| disk read inside the run | {num(r['disk_read_gb_s_in_run'], '{:.2f}')} GB/s |",
        f"| pinned host -> GPU | {num(r['pinned_gb_s'], '{:.1f}')} GB/s |",
        f"| blocks GPU / RAM / disk | {r['tiers']['gpu']} / {r['tiers']['ram']} / {r['tiers']['disk']} |",
        f"| step (disk tier) | {num(r['step_s'])} s |",
        f"| bound (max of resident {num(r['bound_parts_s']['resident_s'])}, disk {num(r['bound_parts_s']['disk_s'])}, "
        f"PCIe {num(r['bound_parts_s']['pcie_s'])}) | {num(r['bound_s'])} s |",
        f"| step / bound (goal <= 1.10) | {num(r['step_over_bound'], '{:.2f}')} |",
        f"| peak RSS (goal <= budget + 1 GB) | {num(r['peak_rss_gb'], '{:.2f}')} GB "
        f"({'ok' if r['rss_within_budget_plus_1gb'] else 'ABOVE'}) |",
        *([f"| peak RSS growth from the load's start ({num(r['start_rss_gb'], '{:.2f}')} GB: python, torch, CUDA "
           f"context) | {num(r['peak_rss_gb'] - r['start_rss_gb'], '{:.2f}')} GB "
           f"({'ok' if r['rss_growth_within_budget_plus_1gb'] else 'ABOVE'}) |"] if "start_rss_gb" in r else []),
        *([f"| the model file in the page cache after the run | {num(r['page_cache_gb'], '{:.2f}')} GB of "
           f"{num(r['model_file_gb'], '{:.2f}')} GB |"] if "page_cache_gb" in r else []),
        f"| output equal to resident, bit for bit | {r['equal_to_resident']} |",
        f"| accelerate disk_offload step | {num(r['accelerate_disk_offload_step_s'])} s "
        f"({num(r['accelerate_over_ours'], '{:.2f}')}x ours) |",
        "",
    ])


def add_run_args(parser) -> None:
    parser.add_argument("--ram-budget-gb", type=float, required=True, help="RAM for streamed blocks (below the model)")
    parser.add_argument("--gpu-budget-gb", type=float, default=None,
                        help="VRAM for weights (default: no block resident, every block streams)")
    parser.add_argument("--depth", type=int, default=None,
                        help="blocks of the demo model (default: the size's own; 1b at 24 blocks is a 4 GB INT8 file)")
    parser.add_argument("--read-test-gb", type=float, default=1.0, help="bytes read by the cold disk test")
    parser.add_argument("--no-accelerate", action="store_true", help="skip accelerate's disk offload")


if __name__ == "__main__":
    sys.exit(demo_bench_main(sys.argv[1:], description=__doc__, script="disk_tier.py", title=TITLE, run=run,
                             render=render, add_run_args=add_run_args, print_table=True))
