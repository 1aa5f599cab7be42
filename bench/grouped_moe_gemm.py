"""HunyuanImage-3's expert MLP on one GPU: our grouped W8A8 GEMM vs bf16 ``torch._grouped_mm`` vs a bf16 loop.

    python bench/grouped_moe_gemm.py [--rows 32768 131072] [--out RESULT.json] [--sweep]
    python bench/grouped_moe_gemm.py --smoke        # tiny shapes on the CPU: checks the script, times nothing real

64 experts, top-8 routing (random, skewed popularity: uneven groups), hidden 4096, expert width 3072:
``gate_and_up_proj`` [6144, 4096] per expert on the routed rows (each token's row once per chosen expert) and
``down_proj`` [4096, 3072]. Rows = tokens x 8 (32768 = 4096 tokens, 131072 = 16384 tokens).

Lines per shape (CUDA events around each call, median of 20 after 5 warm-up calls):

* ``int8 grouped``     - ``kernels.grouped.grouped_int8_linear``: one Triton launch, the gate_and_up rows gathered
                         inside the kernel (``row_index``), no host synchronisation;
* ``bf16 grouped_mm``  - ``torch._grouped_mm`` on the same rows (gate_and_up: on the gathered bf16 copy);
* ``bf16 loop``        - one ``x[a:b] @ w[e].T`` per expert (offsets read on the host beforehand, not timed);
* producers, apart: the int8 road's ``quantize_rows`` of the tokens and ``silu_gate_quantize`` of the gate_and_up
  output; the bf16 road's gather ``x[row_index]`` and ``silu_gate``.

TOPS = 2 * rows * N * K / time. ``speedup`` = bf16 grouped_mm time / int8 grouped time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from benchlib import event_median_ms, import_package, versions

EXPERTS, TOP_K, HIDDEN, EXPERT_WIDTH = 64, 8, 4096, 3072


def _time_ms(fn, device: str, reps: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` (benchlib.event_median_ms: CUDA events on a GPU, perf_counter on the CPU)."""
    return event_median_ms(fn, reps=reps, warmup=warmup)


def routing(tokens: int, experts: int, top_k: int, gen: torch.Generator, device: str):
    """Random top-k routing with skewed expert popularity -> (counts [E] on the CPU, group_offsets [E + 1],
    row_index [tokens * top_k]: the token of each expert row, rows sorted by expert)."""
    from comfyui_headroom.kernels.grouped import group_offsets_from_counts

    popularity = torch.randn(experts, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen) + popularity
    chosen = logits.topk(top_k, dim=1).indices.flatten()
    order = torch.argsort(chosen, stable=True)
    counts = torch.bincount(chosen, minlength=experts)
    return counts, group_offsets_from_counts(counts).to(device), (order // top_k).to(device)


def _int8_experts(n: int, k: int, experts: int, gen: torch.Generator, device: str):
    """Random bf16 expert weights ``[E, n, k]`` and their row-wise INT8 form (drawn on the device with ``gen``, a
    generator of that device, one expert at a time: the float32 copy never exists for all experts at once)."""
    from comfyui_headroom.kernels.int8 import quantize_weight

    w = torch.empty(experts, n, k, dtype=torch.bfloat16, device=device)
    q = torch.empty(experts, n, k, dtype=torch.int8, device=device)
    s = torch.empty(experts, n, dtype=torch.float32, device=device)
    for e in range(experts):
        w_e = torch.randn(n, k, generator=gen, device=device) * 0.02
        w[e] = w_e.to(torch.bfloat16)
        q[e], s[e] = quantize_weight(w_e)
    return w, q, s


def _bf16_loop(x, w, bounds):
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    for e in range(w.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if a != b:
            torch.matmul(x[a:b], w[e].t(), out=out[a:b])
    return out


def sweep_tiles(device: str, reps: int, calls: dict) -> dict:
    """Time each shape's int8 grouped GEMM with every tile this architecture lists (``GROUPED_CONFIGS``) plus a few
    neighbours: what to look at before changing the tile table or ``pick_config``'s rule."""
    from comfyui_headroom.kernels import triton_grouped_w8a8 as tg
    from comfyui_headroom.kernels.configs import GemmConfig, arch_of

    listed = tg.GROUPED_CONFIGS.get(arch_of(torch.device(device)), tg.GROUPED_CONFIGS["fallback"])
    extra = [GemmConfig(128, 256, 128, 8, 8, 4), GemmConfig(128, 256, 128, 8, 8, 3, tma=True),
             GemmConfig(128, 256, 128, 8, 8, 4, tma=True), GemmConfig(128, 256, 64, 8, 8, 4, tma=True),
             GemmConfig(128, 128, 128, 8, 8, 4, tma=True), GemmConfig(128, 256, 128, 16, 8, 3, tma=True),
             GemmConfig(64, 256, 128, 8, 4, 4, tma=True)] if device == "cuda" else []
    out = {}
    for cfg in list(dict.fromkeys(listed + extra)):
        key = (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}"
               f"{' tma' if cfg.tma else ''}")
        with tg.override(cfg):
            try:
                out[key] = {name: _time_ms(fn, device, reps) for name, fn in calls.items()}
            except Exception as err:  # noqa: BLE001 - a tile that does not fit (shared memory): say so, go on
                out[key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"}
    return out


def measure(rows: int, gen: torch.Generator, device: str, experts: int, hidden: int, width: int,
            weights: dict, reps: int, sweep: bool = False) -> dict:
    from comfyui_headroom.kernels import grouped
    from comfyui_headroom.kernels.grouped import (
        grouped_float_linear,
        grouped_int8_linear,
        silu_gate,
        silu_gate_quantize,
    )
    from comfyui_headroom.kernels.int8 import quantize_activation

    tokens = rows // TOP_K
    counts, offsets, row_index = routing(tokens, experts, TOP_K, gen, device)
    bounds = offsets.tolist()
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    if device == "cuda":
        from comfyui_headroom.kernels.triton_quant import quantize_rows
    else:
        quantize_rows = quantize_activation
    qx, sx = quantize_rows(x)
    x_rows = x[row_index]
    w_up, q_up, s_up = weights["up"]
    w_down, q_down, s_down = weights["down"]
    h = grouped_int8_linear(qx, sx, q_up, s_up, offsets, row_index)
    g = silu_gate_quantize(h)
    h_bf16 = grouped_float_linear(x_rows, w_up, offsets)
    gated = silu_gate(h_bf16)
    t = lambda fn: _time_ms(fn, device, reps)  # noqa: E731
    lines = {
        "gate_and_up": {
            "n": 2 * width, "k": hidden,
            "int8 grouped": t(lambda: grouped_int8_linear(qx, sx, q_up, s_up, offsets, row_index)),
            "bf16 grouped_mm": t(lambda: grouped_float_linear(x_rows, w_up, offsets)),
            "bf16 loop": t(lambda: _bf16_loop(x_rows, w_up, bounds)),
            "int8 producer (quantize tokens)": t(lambda: quantize_rows(x)),
            "bf16 producer (gather rows)": t(lambda: x[row_index]),
        },
        "down": {
            "n": hidden, "k": width,
            "int8 grouped": t(lambda: grouped_int8_linear(g.q, g.scale, q_down, s_down, offsets)),
            "bf16 grouped_mm": t(lambda: grouped_float_linear(gated, w_down, offsets)),
            "bf16 loop": t(lambda: _bf16_loop(gated, w_down, bounds)),
            "int8 producer (silu_gate_quantize)": t(lambda: silu_gate_quantize(h)),
            "bf16 producer (silu_gate)": t(lambda: silu_gate(h_bf16)),
        },
    }
    for shape in lines.values():
        flops = 2.0 * rows * shape["n"] * shape["k"]
        shape["tops"] = {name: flops / (ms * 1e-3) / 1e12 for name, ms in shape.items()
                         if isinstance(ms, float) and "producer" not in name}
        shape["speedup"] = shape["bf16 grouped_mm"] / shape["int8 grouped"]
    up, down = lines["gate_and_up"], lines["down"]
    int8_total = (up["int8 producer (quantize tokens)"] + up["int8 grouped"]
                  + down["int8 producer (silu_gate_quantize)"] + down["int8 grouped"])
    bf16_total = (up["bf16 producer (gather rows)"] + up["bf16 grouped_mm"]
                  + down["bf16 producer (silu_gate)"] + down["bf16 grouped_mm"])
    tiles = sweep_tiles(device, reps, {
        "gate_and_up": lambda: grouped_int8_linear(qx, sx, q_up, s_up, offsets, row_index),
        "down": lambda: grouped_int8_linear(g.q, g.scale, q_down, s_down, offsets),
    }) if sweep else None
    return {
        "rows": rows, "tokens": tokens, "experts": experts, "tile_sweep_ms": tiles,
        "rows_per_expert": {"min": int(counts.min()), "max": int(counts.max()), "mean": rows / experts},
        "grouped_mm_ran": bool(grouped._GROUPED_MM_RUNS.get(x.device, False)),
        "shapes": lines,
        "mlp_ms": {"int8": int8_total, "bf16": bf16_total, "speedup": bf16_total / int8_total},
    }


def run(rows_per_token_pairs=(4096 * 8, 16384 * 8), experts: int = EXPERTS, hidden: int = HIDDEN,
        width: int = EXPERT_WIDTH, seed: int = 0, device: str = "cuda", reps: int = 20, sweep: bool = False) -> dict:
    """Time every line for each total of expert rows (tokens x 8) in ``rows_per_token_pairs``; returns the result
    dict (what ``--out`` writes)."""
    import_package()
    from comfyui_headroom.kernels import triton_grouped_w8a8

    gen = torch.Generator().manual_seed(seed)
    weight_gen = torch.Generator(device=device).manual_seed(seed)
    weights = {"up": _int8_experts(2 * width, hidden, experts, weight_gen, device),
               "down": _int8_experts(hidden, width, experts, weight_gen, device)}
    result = {
        "what": "grouped MoE GEMM, HunyuanImage-3 expert MLP", "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": versions("triton"), "experts": experts, "top_k": TOP_K, "hidden": hidden, "width": width,
        "configs": {str(rows): str(triton_grouped_w8a8.pick_config(torch.device(device), rows, experts))
                    for rows in rows_per_token_pairs},
        "runs": [measure(rows, gen, device, experts, hidden, width, weights, reps, sweep)
                 for rows in rows_per_token_pairs],
    }
    return result


def render(result: dict) -> str:
    """A markdown table per run: ms and TOPS per line, the ratios."""
    out = [f"# Grouped MoE GEMM ({result['gpu']}, {result['experts']} experts, top-{result['top_k']}, "
           f"hidden {result['hidden']}, width {result['width']})", ""]
    for run_ in result["runs"]:
        per = run_["rows_per_expert"]
        out += [f"## {run_['rows']} expert rows ({run_['tokens']} tokens; rows per expert {per['min']}-{per['max']}, "
                f"mean {per['mean']:.0f}; torch._grouped_mm ran: {run_['grouped_mm_ran']})", "",
                "| shape | line | ms | TOPS |", "|---|---|---:|---:|"]
        for shape_name, shape in run_["shapes"].items():
            for name, ms in shape.items():
                if isinstance(ms, float) and name != "speedup":
                    tops = shape["tops"].get(name)
                    out.append(f"| {shape_name} [{shape['n']}x{shape['k']}] | {name} | {ms:.3f} | "
                               f"{'' if tops is None else f'{tops:.0f}'} |")
            out.append(f"| {shape_name} | **bf16 grouped_mm / int8 grouped** | **{shape['speedup']:.2f}x** | |")
        mlp = run_["mlp_ms"]
        out += [f"| MLP (producers + both GEMMs) | int8 {mlp['int8']:.3f} ms vs bf16 {mlp['bf16']:.3f} ms | "
                f"**{mlp['speedup']:.2f}x** | |", ""]
        if run_.get("tile_sweep_ms"):
            out += ["| tile (M x N x K, group, warps, stages) | gate_and_up ms | down ms |", "|---|---:|---:|"]
            for key, times in run_["tile_sweep_ms"].items():
                cells = (f"{times['gate_and_up']:.3f} | {times['down']:.3f}" if "error" not in times
                         else f"{times['error']} | ")
                out.append(f"| {key} | {cells} |")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096 * 8, 16384 * 8],
                        help="expert rows (tokens x 8) per run")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--sweep", action="store_true", help="also time the int8 GEMMs with each candidate tile")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script only)")
    args = parser.parse_args(argv)
    if args.smoke:
        result = run((64, 256), experts=64, hidden=64, width=32, seed=args.seed, device="cpu", reps=2,
                     sweep=args.sweep)
    else:
        if not torch.cuda.is_available():
            print("bench/grouped_moe_gemm.py needs a CUDA GPU (--smoke checks the script on the CPU)", file=sys.stderr)
            return 2
        result = run(tuple(args.rows), seed=args.seed, reps=args.reps, sweep=args.sweep)
    print(render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
