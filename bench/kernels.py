"""INT8 linear kernels vs bf16 and the peers, on one CUDA GPU, in one run.

    python bench/kernels.py run [--json OUT.json] [--md OUT.md] [--quick] [--tune]
    python bench/kernels.py asm [--out DIR]       # wgmma / TMA / spill counts of the compiled kernels
    python bench/kernels.py write RESULT.json      # rewrite "## Kernels" in docs/PERFORMANCE.md

Every time is a ``triton.testing.do_bench`` median (CUDA events, L2 flushed before each repetition) on
random data. Columns:

* ``bf16``    - ``F.linear`` on the bf16 weight (cuBLAS);
* ``ours``    - ``comfyui_headroom.kernels.int8_linear`` as a model calls it: the dispatcher's automatic
                choice, activation quantization INCLUDED (W8A8 at M > 256, W8A16 at M <= 256);
* ``gemm``    - our W8A8 GEMM alone on pre-quantized activations, and ``quant`` the quantization alone;
* ``int_mm``  - our activation quantization + ``torch._int_mm`` (cuBLAS INT8) + scaling in torch;
* ``bnb``     - bitsandbytes ``Linear8bitLt`` (has_fp16_weights=False, default threshold 6.0);
* ``ck``      - ComfyUI's own INT8: comfy-kitchen ``int8_linear`` (tensor-wise weight scale), if importable.

TOPS = 2*M*N*K / time, against the INT8 tensor-core peak of DESIGN.md (~1980 TOPS on H100 SXM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import PERFORMANCE_MD, graph_ms, import_package, median_ms, write_section

ROOT = Path(__file__).resolve().parents[1]
INT8_PEAK_TOPS = 1980.0
BIG_M = (1024, 4096, 16384)
SMALL_M = (1, 16, 256)
KN = ((3072, 3072), (3072, 12288), (12288, 3072), (5120, 5120), (5120, 13824))


_bench = median_ms


def _try(fn):
    try:
        return fn(), None
    except Exception as err:  # a peer that cannot run here: keep going, say why
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def _bnb_layer(weight: torch.Tensor, bias: torch.Tensor):
    import bitsandbytes as bnb

    n, k = weight.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False)
    layer.load_state_dict({"weight": weight.cpu(), "bias": bias.cpu()})
    return layer.to(weight.device)


def _ck_fn(x, qw_t, sw_t, bias):
    import comfy_kitchen as ck

    def run():
        return ck.int8_linear(x, qw_t, sw_t, bias, out_dtype=x.dtype)

    run()
    return run


_graph_bench = graph_ms


def measure_shape(m: int, k: int, n: int, gen: torch.Generator, peers: dict, quick: bool) -> dict:
    from comfyui_headroom.kernels import backends, choose_kernel, int8_linear
    from comfyui_headroom.kernels.int8 import quantize_weight
    from comfyui_headroom.kernels.triton_quant import quantize_rows
    from comfyui_headroom.kernels.triton_w8a8 import w8a8_matmul

    dev = "cuda"
    x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dev, torch.bfloat16)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dev, torch.bfloat16)
    qw, sw = quantize_weight(w, "rowwise")
    qw_t, sw_t = quantize_weight(w, "tensorwise")
    ops = 2.0 * m * n * k
    rep = 25 if quick else 60
    row: dict = {"m": m, "k": k, "n": n}

    def bf16():
        return F.linear(x, w, bias)

    def ours():
        return int8_linear(x, qw, sw, bias)

    from comfyui_headroom.kernels import configs, triton_w8a8

    row["ours_kernel"] = choose_kernel(x, qw, sw)
    triton_w8a8.LAST_COMPILED.pop("gluon", None)
    ours()  # compile outside the timing
    if "gluon" in triton_w8a8.LAST_COMPILED:
        row["ours_kernel"] += " (gluon)"
    row["bf16_ms"] = _bench(bf16, rep)
    row["ours_ms"] = _bench(ours, rep)
    row["bf16_g"] = _graph_bench(bf16, rep)
    row["ours_g"] = _graph_bench(ours, rep)
    if m > 256:
        qa, sa = quantize_rows(x)
        row["gemm_g"] = _graph_bench(lambda: w8a8_matmul(qa, sa, qw, sw, bias, torch.bfloat16), rep)
        row["quant_g"] = _graph_bench(lambda: quantize_rows(x), rep)
        if row["ours_kernel"].endswith("(gluon)"):  # the same GEMM through the Triton kernel, for comparison
            configs.set_gluon(False)
            try:
                row["gemm_triton_g"] = _graph_bench(lambda: w8a8_matmul(qa, sa, qw, sw, bias, torch.bfloat16), rep)
            finally:
                configs.set_gluon(True)
        row["quant_gbs"] = 3.0 * m * k / (row["quant_g"] * 1e-3) / 1e9
    else:
        row["w8a8_g"], _ = _try(lambda: _graph_bench(lambda: backends.triton_w8a8(x, qw, sw, bias, 128), rep))
    if m > 16:
        row["int_mm_g"], row["int_mm_err"] = _try(
            lambda: _graph_bench(lambda: backends.int_mm(x, qw, sw, bias, 128), rep))
    if peers.get("bnb"):
        def bnb_time():
            layer = _bnb_layer(w, bias)
            with torch.inference_mode():
                layer(x)
                return _bench(lambda: layer(x), rep)

        row["bnb_ms"], row["bnb_err"] = _try(bnb_time)
    if peers.get("ck"):
        row["ck_ms"], row["ck_err"] = _try(lambda: _bench(_ck_fn(x, qw_t, sw_t, bias), rep))
    row["ours_tops"] = ops / (row["ours_g"] * 1e-3) / 1e12
    row["bf16_tflops"] = ops / (row["bf16_g"] * 1e-3) / 1e12
    if "gemm_g" in row:
        row["gemm_tops"] = ops / (row["gemm_g"] * 1e-3) / 1e12
    del x, w, qw, qw_t
    torch.cuda.empty_cache()
    return row


def tune_rows(gen: torch.Generator) -> list[dict]:
    """Kernel-only times of a few tile configs: what the per-architecture defaults are chosen from."""
    from comfyui_headroom.kernels import configs
    from comfyui_headroom.kernels.configs import GemmConfig as G
    from comfyui_headroom.kernels.int8 import quantize_weight
    from comfyui_headroom.kernels.triton_quant import quantize_rows
    from comfyui_headroom.kernels.triton_w8a8 import w8a8_matmul
    from comfyui_headroom.kernels.triton_w8a16 import w8a16_matmul

    w8a8_rowwise = {
        "128x256x128 s3 w8 tma": G(128, 256, 128, 8, 8, 3, tma=True),
        "128x128x128 s4 w8 tma": G(128, 128, 128, 8, 8, 4, tma=True),
        "256x128x128 s3 w8 tma": G(256, 128, 128, 8, 8, 3, tma=True),
        "128x256x64 s4 w8 tma": G(128, 256, 64, 8, 8, 4, tma=True),
        "128x128x64 s3 w8 pointer": G(128, 128, 64, 8, 8, 3),
        "128x256x64 s5 w8 tma": G(128, 256, 64, 8, 8, 5, tma=True),
        "128x256x128 s3 w8 g16 tma": G(128, 256, 128, 16, 8, 3, tma=True),
        "128x256x128 s3 w8 g4 tma": G(128, 256, 128, 4, 8, 3, tma=True),
        "256x128x64 s4 w8 tma": G(256, 128, 64, 8, 8, 4, tma=True),
        "128x128x256 s2 w8 tma": G(128, 128, 256, 8, 8, 2, tma=True),
    }
    w8a8_block = {
        "128x128x128 s4 w8 tma": G(128, 128, 128, 8, 8, 4, tma=True),
        "128x128x128 s3 w8 tma": G(128, 128, 128, 8, 8, 3, tma=True),
        "128x128x64 s4 w8 tma": G(128, 128, 64, 8, 8, 4, tma=True),
        "128x256x128 s3 w8 tma": G(128, 256, 128, 8, 8, 3, tma=True),
    }
    w8a16 = {
        "16x64x256 s4 w8": G(16, 64, 256, 1, 8, 4),
        "16x32x512 s3 w8": G(16, 32, 512, 1, 8, 3),
        "16x64x128 s4 w4": G(16, 64, 128, 1, 4, 4),
        "16x128x128 s4 w8": G(16, 128, 128, 1, 8, 4),
    }
    jobs = [("w8a8 rowwise", 4096, k, n, w8a8_rowwise) for k, n in ((3072, 3072), (3072, 12288), (5120, 13824))]
    jobs += [("w8a8 block", 4096, k, n, w8a8_block) for k, n in ((3072, 3072), (5120, 13824))]
    jobs += [("w8a16", m, k, n, w8a16) for m in (1, 256) for k, n in ((3072, 3072), (5120, 13824))]
    out = []
    for kind, m, k, n, variants in jobs:
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        method = "block" if "block" in kind else "rowwise"
        qw, sw = quantize_weight((torch.randn(n, k, generator=gen) * 0.02).cuda(), method)
        qa, sa = quantize_rows(x)
        row = {"kind": kind, "m": m, "k": k, "n": n}
        for name, cfg in variants.items():
            if kind == "w8a16":
                def run(cfg=cfg):
                    with configs.override(w8a16=cfg):
                        return w8a16_matmul(x, qw, sw, None)
            else:
                def run(cfg=cfg):
                    with configs.override(w8a8=cfg, tma=cfg.tma):
                        return w8a8_matmul(qa, sa, qw, sw, None, torch.bfloat16)

            ms, err = _try(lambda: (run(), _bench(run, 40))[1])
            row[name] = ms if ms is not None else err
        out.append(row)
    return out


def asm_report(out_dir: str) -> str:
    """Compile the main kernels at a real shape and count their matrix/TMA instructions (PTX and SASS)."""
    import shutil
    import subprocess
    import tempfile

    import_package()
    from comfyui_headroom.kernels import triton_w8a8
    from comfyui_headroom.kernels.int8 import quantize_weight
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    gen = torch.Generator().manual_seed(1)
    lines = []
    for label, m, method in (("rowwise M=4096", 4096, "rowwise"), ("block M=4096", 4096, "block"),
                             ("rowwise odd K", 1000, "rowwise")):
        k = 3072 if label != "rowwise odd K" else 3001
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        qw, sw = quantize_weight(torch.randn(3072, k, generator=gen).cuda(), method)
        qa, sa = quantize_rows(x)
        triton_w8a8.LAST_COMPILED.clear()
        triton_w8a8.w8a8_matmul(qa, sa, qw, sw, None, torch.bfloat16)
        variant, compiled = next(iter(triton_w8a8.LAST_COMPILED.items()))
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        tool = shutil.which("cuobjdump")
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout if tool else ""
        wgmma = sorted({line.split()[0] for line in ptx.splitlines() if "wgmma.mma_async" in line})
        meta = compiled.metadata
        counts = {op: sass.count(op) for op in ("IGMMA", "HGMMA", "IMMA", "HMMA", "UTMALDG", "UTMASTG", "LDL", "STL")}
        lines.append(f"{label} [{variant}]: shared={getattr(meta, 'shared', '?')} B, regs={getattr(compiled, 'n_regs', '?')}, "
                     f"spills={getattr(compiled, 'n_spills', '?')}; PTX wgmma: {wgmma or 'none'}; "
                     f"PTX TMA loads: {ptx.count('cp.async.bulk.tensor')}; SASS: {counts}")
    text = "\n".join(lines) + "\n"
    Path(out_dir, "asm.txt").write_text(text)
    print(text)
    return text


def _dist_version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "?"


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run(args) -> dict:
    import_package()
    env = environment()
    peers = {}
    for name, mod in (("bnb", "bitsandbytes"), ("ck", "comfy_kitchen")):
        try:
            __import__(mod)
            peers[name] = True
            env[f"{name}_version"] = _dist_version(mod)
        except Exception as err:
            peers[name] = False
            env[f"{name}_missing"] = f"{type(err).__name__}: {err}"
    print(json.dumps(env), flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    ms_list = SMALL_M + BIG_M
    for m in ms_list:
        for k, n in KN:
            start = time.time()
            row = measure_shape(m, k, n, gen, peers, args.quick)
            rows.append(row)
            print(f"M={m:6d} K={k:6d} N={n:6d} GPU: bf16 {row['bf16_g']:.4f} ms ours[{row['ours_kernel']}] "
                  f"{row['ours_g']:.4f} ms = {row['bf16_g'] / row['ours_g']:.2f}x; eager "
                  f"{row['bf16_ms'] / row['ours_ms']:.2f}x  ({time.time() - start:.1f}s)", flush=True)
    command = "python bench/kernels.py run" + (" --quick" if args.quick else "") + (" --tune" if args.tune else "")
    result = {"env": env, "rows": rows, "command": command}
    if args.tune:
        result["tune"] = tune_rows(gen)
        print(json.dumps(result["tune"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    md = render(result)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return result


def _x(base, t):
    return f"{base / t:.2f}x" if base and t else "-"


def _ms(t):
    return f"{t:.3f}" if isinstance(t, float) else "-"


def render(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    lines = [
        f"GPU: {env['gpu']} ({env['sms']} SMs, sm{env['capability'].replace('.', '')}); torch {env['torch']}, "
        f"triton {env['triton']}, bitsandbytes {env.get('bnb_version', '-')}, comfy-kitchen "
        f"{env.get('ck_version', '-')}; {env['date']}; command: `{result['command']}` (one run; "
        "`triton.testing.do_bench` medians, L2 flushed before every repetition; random bf16 data, "
        "row-wise INT8 weights).",
        "",
        "Two timings: **GPU** = the call captured once in a CUDA graph and replayed (kernel time, no Python or "
        "launch overhead: what a model sees when the CPU runs ahead of the GPU); **eager** = the plain Python "
        "call, where CPU overhead shows whenever it exceeds the GPU time. Ratios are bf16 time / INT8 time "
        "(>1 = INT8 faster).",
        "",
        "Large M (W8A8; *ours* includes the activation quantization):",
        "",
        "| M | K | N | bf16 GPU ms | ours GPU ms (kernel) | **ours vs bf16 (GPU)** | ours TOPS (% of 1980) | GEMM alone "
        "GPU ms (vs bf16) | Triton-kernel GEMM GPU ms (GEMM alone vs it) | quant GPU ms (GB/s) | _int_mm+scale GPU ms "
        "(ours vs it) | ours vs bf16 (eager) | bnb eager (vs bf16) | ComfyUI ck eager (vs bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    big = [r for r in rows if r["m"] > 256]
    for r in big:
        lines.append(
            f"| {r['m']} | {r['k']} | {r['n']} | {_ms(r['bf16_g'])} | {_ms(r['ours_g'])} ({r['ours_kernel']}) | "
            f"**{_x(r['bf16_g'], r['ours_g'])}** | {r['ours_tops']:.0f} ({100 * r['ours_tops'] / INT8_PEAK_TOPS:.0f}%) | "
            f"{_ms(r.get('gemm_g'))} ({_x(r['bf16_g'], r.get('gemm_g'))}) | "
            f"{_ms(r.get('gemm_triton_g'))} ({_x(r.get('gemm_triton_g'), r.get('gemm_g'))}) | "
            f"{_ms(r.get('quant_g'))} ({r.get('quant_gbs', 0):.0f}) | "
            f"{_ms(r.get('int_mm_g'))} ({_x(r.get('int_mm_g'), r['ours_g'])}) | "
            f"{_x(r['bf16_ms'], r['ours_ms'])} | "
            f"{_ms(r.get('bnb_ms'))} ({_x(r['bf16_ms'], r.get('bnb_ms'))}) | "
            f"{_ms(r.get('ck_ms'))} ({_x(r['bf16_ms'], r.get('ck_ms'))}) |"
        )
    lines.append("")
    every = [r["bf16_g"] / r["ours_g"] for r in big if r["m"] >= 4096]
    if every:
        lines.append(f"- Every M >= 4096 shape together: ours vs bf16 (GPU) median **{statistics.median(every):.2f}x**.")
    for m in BIG_M:
        sel = [r for r in big if r["m"] == m]
        if not sel:
            continue
        med = lambda key_a, key_b: statistics.median(  # noqa: E731
            [r[key_a] / r[key_b] for r in sel if r.get(key_a) and r.get(key_b)] or [float("nan")])
        gpu = [r["bf16_g"] / r["ours_g"] for r in sel]
        lines.append(
            f"- M = {m}: ours vs bf16 (GPU) median **{statistics.median(gpu):.2f}x** (min {min(gpu):.2f}x, max "
            f"{max(gpu):.2f}x); GEMM alone {med('bf16_g', 'gemm_g'):.2f}x (the Triton kernel's GEMM: "
            f"{med('bf16_g', 'gemm_triton_g'):.2f}x); ours vs _int_mm+scale "
            f"{med('int_mm_g', 'ours_g'):.2f}x; eager ours vs bf16 {med('bf16_ms', 'ours_ms'):.2f}x."
        )
    lines += [
        "",
        "Small M (the dispatcher picks W8A16 at M <= 16: int8 weight read, bf16 MMA; W8A8 above):",
        "",
        "| M | K | N | bf16 GPU ms | ours GPU ms (kernel) | **ours vs bf16 (GPU)** | ours vs bf16 (eager) "
        "| W8A8 incl. quant GPU ms | _int_mm+scale GPU ms | bnb eager ms | ComfyUI ck eager ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["m"] > 256:
            continue
        lines.append(
            f"| {r['m']} | {r['k']} | {r['n']} | {_ms(r['bf16_g'])} | {_ms(r['ours_g'])} ({r['ours_kernel']}) | "
            f"**{_x(r['bf16_g'], r['ours_g'])}** | {_x(r['bf16_ms'], r['ours_ms'])} | {_ms(r.get('w8a8_g'))} | "
            f"{_ms(r.get('int_mm_g'))} | {_ms(r.get('bnb_ms'))} | {_ms(r.get('ck_ms'))} |"
        )
    for m in SMALL_M:
        gpu = [r["bf16_g"] / r["ours_g"] for r in rows if r["m"] == m]
        if gpu:
            lines.append(f"{'' if m != SMALL_M[0] else chr(10)}- M = {m}: ours vs bf16 (GPU) median "
                         f"**{statistics.median(gpu):.2f}x** (min {min(gpu):.2f}x, max {max(gpu):.2f}x).")
    errs = sorted({f"{key[:-4]}: {r[key]}" for r in rows for key in r if key.endswith("_err") and r[key]})
    missing = [f"{k[:-8]}: {v}" for k, v in env.items() if k.endswith("_missing")]
    if errs or missing:
        lines += ["", "Peers that did not run: " + "; ".join(missing + errs)]
    if result.get("tune"):
        lines += ["", "Tile sweep, kernel alone (ms; activation quantization excluded; default config first):", ""]
        for r in result["tune"]:
            names = [c for c in r if c not in ("kind", "m", "k", "n")]
            cells = ", ".join(f"{c}: " + (f"{r[c]:.3f}" if isinstance(r[c], float) else "failed") for c in names)
            lines.append(f"- {r['kind']} M={r['m']} K={r['k']} N={r['n']}: {cells}")
    return "\n".join(lines) + "\n"


def write_docs(result_path: str, notes_path: str | None = None) -> None:
    result = json.loads(Path(result_path).read_text())
    body = render(result)
    if notes_path:
        body += "\n" + Path(notes_path).read_text().strip() + "\n"
    write_section("Kernels", body)
    print(f"wrote the Kernels section of {PERFORMANCE_MD}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--json")
    p_run.add_argument("--md")
    p_run.add_argument("--quick", action="store_true", help="shorter repetitions")
    p_run.add_argument("--tune", action="store_true", help="also time a few tile configs per kernel")
    p_tune = sub.add_parser("tune", help="only the tile-config timings (GEMM alone), as JSON")
    p_tune.add_argument("--json")
    p_asm = sub.add_parser("asm", help="count wgmma/TMA instructions of the compiled W8A8 kernels")
    p_asm.add_argument("--out", default=".")
    p_write = sub.add_parser("write")
    p_write.add_argument("result")
    p_write.add_argument("--notes", help="markdown appended after the tables (analysis)")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        if not torch.cuda.is_available():
            print("bench/kernels.py run needs a CUDA GPU", file=sys.stderr)
            return 2
        run(args)
    elif args.cmd == "tune":
        import_package()
        rows = tune_rows(torch.Generator().manual_seed(0))
        text = json.dumps(rows, indent=1)
        print(text)
        if args.json:
            Path(args.json).write_text(text)
    elif args.cmd == "asm":
        asm_report(args.out)
    else:
        write_docs(args.result, args.notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
