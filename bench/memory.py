"""Memory benchmark on one CUDA GPU: block streaming vs the PCIe bound, accelerate offload, soft unload.

    python bench/memory.py run [--hidden 2048] [--depth 24] [--tokens 4096] [--steps 5] [--json OUT.json]
    python bench/memory.py write RESULT.json     # rewrite "## Memory" in docs/PERFORMANCE.md
                                                 # (a "notes" list in RESULT.json is printed under the tables)

* Pinned / pageable host<->device bandwidth, measured first (1 GiB copies, median of 5).
* A 24-block transformer (~1.2 B parameters at hidden 2048: attention + 4x MLP) at 4096 tokens, bf16 and
  INT8 (our Int8Linear through the kernel dispatcher), with 0 %, 50 % and 90 % of the blocks streamed from
  pinned RAM by :func:`comfyui_headroom.memory.enable_block_streaming`. Bound = max(resident step time,
  streamed bytes / pinned bandwidth); goal: step time <= 1.10x bound. Then resident and the two default
  streaming rows again with every block replayed from CUDA graphs (``cuda_graphs=True``): the host's speed
  out of the step.
* accelerate's ``dispatch_model`` with the same blocks on "cpu" (its device-map offload), same run.
* Soft unload: park the model in pinned RAM and restore it; restore GB/s vs pinned host->device (goal >= 80 %).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchlib import import_package, versions, write_section

ROOT = Path(__file__).resolve().parents[1]
GOAL_STREAM_RATIO = 1.10
GOAL_RESTORE_SHARE = 0.80
GiB = 1024 ** 3


DEVICE = "cuda"  # `--device cpu` only smoke-tests this script's code paths (no pinning, numbers meaningless)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ the model

class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, device, dtype):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, **kw)
        self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.proj = nn.Linear(hidden, hidden, **kw)
        self.norm2 = nn.LayerNorm(hidden, **kw)
        self.fc1 = nn.Linear(hidden, 4 * hidden, **kw)
        self.fc2 = nn.Linear(4 * hidden, hidden, **kw)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, hidden: int, depth: int, heads: int, device, dtype=torch.bfloat16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, heads, device, dtype) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, device=device, dtype=dtype)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


def build(args, int8: bool) -> Model:
    from comfyui_headroom.quant import Int8Linear

    torch.manual_seed(0)
    model = Model(args.hidden, args.depth, args.heads, DEVICE).eval()
    if int8:
        for block in model.blocks:
            for name in ("qkv", "proj", "fc1", "fc2"):
                setattr(block, name, Int8Linear.from_linear(getattr(block, name), "rowwise",
                                                            compute_dtype=torch.bfloat16))
    return model


# ------------------------------------------------------------------------------------------------ measurements

def bandwidth(nbytes: int = GiB, reps: int = 5) -> dict:
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    out = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        pinned = pinned and DEVICE != "cpu"
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        for direction in ("h2d", "d2h"):
            times = []
            for _ in range(reps):
                _sync()
                t0 = time.perf_counter()
                if direction == "h2d":
                    dev.copy_(host, non_blocking=pinned)
                else:
                    host.copy_(dev, non_blocking=pinned)
                _sync()
                times.append(time.perf_counter() - t0)
            out[f"{kind}_{direction}_gbps"] = nbytes / GiB / statistics.median(times)
        del host
    del dev
    _free()
    return out


def step_time(model, x, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(median step seconds, median CPU seconds to issue a step): issue ~ step means the CPU is the limit."""
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        _sync()
        times, issue = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(x)
            issue.append(time.perf_counter() - t0)
            _sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(issue)


# (streamed fraction, order, prefetch): the library defaults (spread, prefetch 2) first, then variants that
# show what the defaults buy (the first blocks resident / a 2-slot ring) and a deeper ring.
VARIANTS = [(0.5, "spread", 2), (0.9, "spread", 2), (0.5, "first", 1), (0.9, "first", 1), (0.9, "spread", 4)]


def _profile(model, x, path: Path) -> None:
    """Two profiled steps: kernel vs copy time, for the record (bench diagnostics, not a measurement)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            model(x)
        _sync()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), encoding="utf-8")
    prof.export_chrome_trace(str(path.with_suffix(".json")))


def streaming_rows(args, int8: bool, bw: dict) -> list[dict]:
    """The resident step, then each streaming variant: eagerly, then (on CUDA) with every block replayed from CUDA
    graphs (``graph_blocks`` / ``cuda_graphs=True``) for resident and the two default variants."""
    from comfyui_headroom.memory import module_bytes

    label = "INT8" if int8 else "bf16"
    model = build(args, int8)
    x = torch.randn(1, args.tokens, args.hidden, device=DEVICE, dtype=torch.bfloat16)
    block_bytes = module_bytes(model.blocks[0])
    rows, reference = _streaming_pass(args, model, x, None, label, block_bytes, bw, VARIANTS, graphs=False)
    if DEVICE != "cpu":
        rows += _streaming_pass(args, model, x, reference, label, block_bytes, bw, VARIANTS[:2], graphs=True)[0]
    del model
    _free()
    return rows


def _streaming_pass(args, model, x, reference, label, block_bytes, bw, variants, graphs: bool):
    """(rows, reference output): one resident row (the bound of this pass's rows; without a ``reference`` its
    output becomes the reference) and one row per variant. With ``graphs`` the warm-up covers every (block,
    ring slot) before the timing."""
    from comfyui_headroom.memory import enable_block_streaming, graph_blocks

    tag = ", CUDA graphs" if graphs else ""
    resident_graphs = graph_blocks(list(model.blocks)) if graphs else None
    resident_s, resident_issue = step_time(model, x, args.steps, warmup=3 if graphs else 2)
    with torch.no_grad():
        out = model(x)
    if resident_graphs is not None:
        resident_graphs.remove()
    first = {"model": label, "streamed_pct": 0, "streamed_blocks": 0, "order": "-", "prefetch": 0, "graphs": graphs,
             "streamed_gb": 0.0, "step_s": resident_s, "issue_s": resident_issue, "bound_s": resident_s, "ratio": 1.0,
             "equal_to_resident": True if reference is None else bool(torch.equal(out, reference)), "stats": None}
    reference = out if reference is None else reference
    rows = [first]
    print(f"  {label} resident{tag}: {resident_s * 1e3:.1f} ms/step (CPU issue {resident_issue * 1e3:.1f} ms), "
          f"equal={first['equal_to_resident']}", flush=True)
    for frac, order, prefetch in variants:
        n_stream = round(frac * args.depth)
        streamer = enable_block_streaming(model, DEVICE, blocks="blocks", blocks_resident=args.depth - n_stream,
                                          prefetch=prefetch, order=order, cuda_graphs=graphs)
        t, issue = step_time(model, x, args.steps, warmup=2 + 2 * (prefetch + 1) if graphs else 2)
        with torch.no_grad():
            equal = bool(torch.equal(model(x), reference))
        stats = streamer.stats.as_dict()
        if graphs:
            stats["graphs"] = streamer.graphs.graph_count
        pinned = all(h.is_pinned() for h in streamer.host_buffers())
        if args.profile and not graphs and (frac, order, prefetch) == VARIANTS[1]:
            _profile(model, x, args.profile / f"profile_{label}_{int(frac * 100)}.txt")
        streamer.disable(DEVICE)
        assert pinned or DEVICE == "cpu", "streamed from pageable memory"
        streamed_bytes = n_stream * block_bytes
        bound = max(resident_s, streamed_bytes / GiB / bw["pinned_h2d_gbps"])
        rows.append({"model": label, "streamed_pct": int(frac * 100), "streamed_blocks": n_stream, "order": order,
                     "prefetch": prefetch, "graphs": graphs, "streamed_gb": streamed_bytes / GiB, "step_s": t,
                     "issue_s": issue, "bound_s": bound, "ratio": t / bound, "equal_to_resident": equal,
                     "stats": stats})
        print(f"  {label} {int(frac * 100)}% streamed ({order}, prefetch {prefetch}){tag}: {t * 1e3:.1f} ms/step "
              f"(CPU issue {issue * 1e3:.1f} ms), bound {bound * 1e3:.1f} ms, ratio {t / bound:.3f}, equal={equal}",
              flush=True)
    return rows, reference


def accelerate_rows(args, int8: bool, resident_s: float) -> list[dict]:
    from accelerate import dispatch_model

    label = "INT8" if int8 else "bf16"
    rows = []
    for frac in (0.5, 0.9):
        n_stream = round(frac * args.depth)
        model = build(args, int8).to("cpu")
        gpu = 0 if DEVICE != "cpu" else "cpu"
        device_map = {f"blocks.{i}": (gpu if i < args.depth - n_stream else "cpu") for i in range(args.depth)}
        device_map["norm_out"] = gpu
        try:
            dispatch_model(model, device_map=device_map, main_device=torch.device(DEVICE), offload_buffers=True,
                           force_hooks=True)
            x = torch.randn(1, args.tokens, args.hidden, device=DEVICE, dtype=torch.bfloat16)
            t = step_time(model, x, max(2, args.steps // 2), warmup=1)[0]
            rows.append({"model": label, "streamed_pct": int(frac * 100), "step_s": t})
            print(f"  accelerate {label} {int(frac * 100)}% offloaded: {t * 1e3:.1f} ms/step", flush=True)
        except Exception as err:  # report, keep benchmarking
            rows.append({"model": label, "streamed_pct": int(frac * 100), "error": f"{type(err).__name__}: {err}"})
            print(f"  accelerate {label} {int(frac * 100)}%: {type(err).__name__}: {err}", flush=True)
        del model
        _free()
    return rows


def soft_unload_rows(args, int8: bool, bw: dict) -> dict:
    from comfyui_headroom.memory import module_bytes, restore, soft_unload

    label = "INT8" if int8 else "bf16"
    model = build(args, int8)
    x = torch.randn(1, 256, args.hidden, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = model(x)
    nbytes = module_bytes(model)
    first = soft_unload(model, pin_memory=DEVICE != "cpu")
    first_unload = first.gb_per_s
    restore(model, DEVICE)
    cycles = []
    for _ in range(3):
        h = soft_unload(model, pin_memory=DEVICE != "cpu")
        unload = h.gb_per_s
        restore(model, DEVICE)
        cycles.append((unload, h.gb_per_s))
    with torch.no_grad():
        equal = bool(torch.equal(model(x), reference))
    unload_gbps = statistics.median(c[0] for c in cycles)
    restore_gbps = statistics.median(c[1] for c in cycles)
    row = {"model": label, "gb": nbytes / GiB, "first_unload_gbps": first_unload, "unload_gbps": unload_gbps,
           "restore_gbps": restore_gbps, "restore_share_of_pinned": restore_gbps / bw["pinned_h2d_gbps"],
           "unload_share_of_pinned": unload_gbps / bw["pinned_d2h_gbps"], "equal": equal}
    print(f"  soft unload {label} {nbytes / GiB:.2f} GB: unload {unload_gbps:.1f} GB/s (first {first_unload:.1f}), "
          f"restore {restore_gbps:.1f} GB/s = {row['restore_share_of_pinned']:.0%} of pinned h2d, equal={equal}",
          flush=True)
    del model
    _free()
    return row


def run(args) -> dict:
    import_package()
    from comfyui_headroom.kernels import kernel_summary, reset_kernel_stats

    props = torch.cuda.get_device_properties(0) if DEVICE != "cpu" else None
    result = {"gpu": props.name if props else "cpu (smoke test)", "gpu_memory_gb": props.total_memory / GiB if props else 0, "versions": versions("triton", "accelerate", "transformers"),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
              "config": {"hidden": args.hidden, "depth": args.depth, "heads": args.heads, "tokens": args.tokens,
                         "steps": args.steps}}
    print(f"{result['gpu']} | {result['versions']} | {result['date']}", flush=True)
    bw = bandwidth(GiB if DEVICE != "cpu" else 1 << 24)
    result["bandwidth"] = bw
    print("  bandwidth: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()), flush=True)
    result["streaming"], result["accelerate"], result["soft_unload"] = [], [], []
    for int8 in [w == "int8" for w in args.weights.split(",")]:
        reset_kernel_stats()
        rows = streaming_rows(args, int8, bw)
        result["streaming"] += rows
        if int8:
            result["int8_kernels"] = {k: v["calls"] for k, v in kernel_summary().items()}
        result["accelerate"] += accelerate_rows(args, int8, rows[0]["step_s"])
        result["soft_unload"].append(soft_unload_rows(args, int8, bw))
    params = sum(p.numel() for p in Model(args.hidden, args.depth, args.heads, "meta").parameters())
    result["parameters"] = params
    _free()
    return result


# ------------------------------------------------------------------------------------------------ the doc

def render(r: dict) -> str:
    bw = r["bandwidth"]
    c = r["config"]
    lines = [
        f"GPU: {r['gpu']} ({r['gpu_memory_gb']:.0f} GiB); torch {r['versions']['torch']} (CUDA {r['versions']['cuda']}), "
        f"triton {r['versions']['triton']}, accelerate {r['versions']['accelerate']}; {r['date']}.",
        f"Command: `{r['command']}`.",
        "",
        f"Model: {c['depth']} transformer blocks, hidden {c['hidden']}, {c['heads']} heads, 4x MLP "
        f"({r['parameters'] / 1e9:.2f} B parameters), batch 1 x {c['tokens']} tokens, median of {c['steps']} "
        "forward passes after 2 warm-ups. INT8 = our `Int8Linear` (row-wise) through the kernel dispatcher "
        f"({', '.join(f'{k}: {v} calls' for k, v in r.get('int8_kernels', {}).items()) or 'n/a'}).",
        "",
        f"Host<->device bandwidth (1 GiB, median of 5): pinned h2d {bw['pinned_h2d_gbps']:.1f} GB/s, d2h "
        f"{bw['pinned_d2h_gbps']:.1f} GB/s; pageable h2d {bw['pageable_h2d_gbps']:.1f} GB/s, d2h "
        f"{bw['pageable_d2h_gbps']:.1f} GB/s (GB = 2^30 bytes).",
        "",
        "### Block streaming (pinned RAM, side-stream prefetch of the next block)",
        "",
        f"Bound = max(resident step time, streamed bytes / pinned h2d bandwidth). Goal: step <= {GOAL_STREAM_RATIO:.2f}x bound. "
        "Rows marked *CUDA graphs* replay every block from CUDA graphs (`enable_block_streaming(..., cuda_graphs=True)`); "
        "their bound uses the graphed resident step.",
        "",
        "| weights | streamed | order, prefetch | streamed GB | step ms | CPU issue ms | bound ms | step / bound | goal | output == resident | accelerate offload ms | accelerate / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    acc = {(a["model"], a["streamed_pct"]): a for a in r["accelerate"]}
    for row in r["streaming"]:
        a = (acc.get((row["model"], row["streamed_pct"]))
             if row["order"] in ("spread", "-") and row["prefetch"] in (0, 2) and not row.get("graphs") else None)
        if a is None:
            acc_ms, speed = "", ""
        elif "error" in a:
            acc_ms, speed = f"failed: {a['error'][:60]}", "-"
        else:
            acc_ms, speed = f"{a['step_s'] * 1e3:.1f}", f"{a['step_s'] / row['step_s']:.2f}x"
        ok = "yes" if row["ratio"] <= GOAL_STREAM_RATIO else "**no**"
        how = ("resident" if not row["prefetch"] else f"{row['order']}, {row['prefetch']}") + (
            ", CUDA graphs" if row.get("graphs") else "")
        lines.append(f"| {row['model']} | {row['streamed_pct']} % ({row['streamed_blocks']} blocks) | {how} | "
                     f"{row['streamed_gb']:.2f} | {row['step_s'] * 1e3:.1f} | {row['issue_s'] * 1e3:.1f} | "
                     f"{row['bound_s'] * 1e3:.1f} | {row['ratio']:.3f} | {ok} | "
                     f"{'yes' if row['equal_to_resident'] else '**no**'} | {acc_ms} | {speed} |")
    lines += [
        "",
        "accelerate: `dispatch_model` with the same blocks mapped to \"cpu\" (`offload_buffers=True`, so the INT8 "
        "buffers are offloaded too); weights travel from its CPU state dict every step.",
        "",
        "### Soft unload (park in pinned RAM, restore)",
        "",
        f"Goal: restore >= {GOAL_RESTORE_SHARE:.0%} of pinned h2d bandwidth. Median of 3 cycles after the first "
        "(which allocates the pinned buffers; later cycles reuse them).",
        "",
        "| weights | GB | first unload GB/s | unload GB/s | restore GB/s | restore / pinned h2d | goal | outputs identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in r["soft_unload"]:
        ok = "yes" if s["restore_share_of_pinned"] >= GOAL_RESTORE_SHARE else "**no**"
        lines.append(f"| {s['model']} | {s['gb']:.2f} | {s['first_unload_gbps']:.1f} | {s['unload_gbps']:.1f} | "
                     f"{s['restore_gbps']:.1f} | {s['restore_share_of_pinned']:.0%} | {ok} | "
                     f"{'yes' if s['equal'] else '**no**'} |")
    if r.get("notes"):
        lines += ["", "### Notes", ""] + [f"* {note}" for note in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--hidden", type=int, default=2048)
    p_run.add_argument("--depth", type=int, default=24)
    p_run.add_argument("--heads", type=int, default=16)
    p_run.add_argument("--tokens", type=int, default=4096)
    p_run.add_argument("--steps", type=int, default=5)
    p_run.add_argument("--json", type=Path)
    p_run.add_argument("--weights", default="bf16,int8", help="which models, in this order (bf16, int8 or both)")
    p_run.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p_run.add_argument("--markdown", type=Path)
    p_run.add_argument("--profile", type=Path, help="folder: profile the 90 %% spread runs (diagnostics)")
    p_write = sub.add_parser("write")
    p_write.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        global DEVICE
        DEVICE = args.device
        if DEVICE != "cpu" and not torch.cuda.is_available():
            print("bench/memory.py needs a CUDA GPU", file=sys.stderr)
            return 2
        result = run(args)
        body = render(result)
        print(body)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
        if args.markdown:
            args.markdown.write_text(body, encoding="utf-8")
        return 0
    write_section("Memory", render(json.loads(args.result.read_text(encoding="utf-8"))))
    print("wrote the Memory section of docs/PERFORMANCE.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
