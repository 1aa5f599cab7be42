"""CPU cost of one INT8 linear call in Python, with the GPU work taken out (a benchmark, not a test).

    python bench/dispatch_overhead.py [--calls 20000] [--profile]
    python bench/dispatch_overhead.py gpu --json OUT.json [--parts issue,resident,memory,kernels] [--profile DIR]

The ``gpu`` form (one CUDA GPU) re-measures what this overhead costs on a real step: host microseconds
to issue one INT8 linear (no sync), the INT8 model step of bench/memory.py (resident, and streamed with
the bf16 rows for comparison) and the M = 1 / M = 4096 rows of bench/kernels.py (--quick repetitions).

Why: at small shapes (and for a whole 24-block model on an H100) the INT8 forward is limited by the
CPU time it takes to *issue* each layer, not by the kernels. This script times the host side alone:

* ``dispatch``            - ``check_args`` + ``choose_kernel`` (the decision), no kernel;
* ``forward reference``   - ``Int8Linear.forward`` forced to the reference path on tiny tensors
                            (dequantize + F.linear on a 16x16 weight: mostly Python);
* ``forward w8a8 stub``   - ``Int8Linear.forward`` through the Triton W8A8 path (activation quant +
                            GEMM) with the two Triton launches replaced by no-op stubs: everything we
                            run per call except the launches themselves (allocations included);
* ``forward w8a16 stub``  - the same for the weight-only path;
* ``triton launch``       - not measurable here (needs a GPU): see docs/PERFORMANCE.md "## Kernels".

Runs on CPU with ``TRITON_INTERPRET=1`` (set here, before triton is imported) so that the Triton paths
are eligible; nothing is interpreted because the kernels are stubbed. Prints microseconds per call
(median of 5 runs). Compare two commits by running it in each checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib import import_package

ROOT = Path(__file__).resolve().parents[1]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


def _stub_triton_kernels():
    """Every launcher of the package (kernels/launch.py) gets a kernel that does nothing; returns what to restore."""
    from comfyui_headroom.kernels import hadamard, launch, triton_quant, triton_w8a8, triton_w8a16  # noqa: F401 (register)

    saved = [(launcher, "fn", launcher.fn) for launcher in launch._LAUNCHERS]
    for launcher, name, _ in saved:
        setattr(launcher, name, _NoLaunch())
    return saved


def _time_per_call(fn, calls: int, runs: int = 5) -> float:
    for _ in range(min(calls, 500)):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples) * 1e6


def _bench_module(name: str):
    """Load bench/<name>.py under a private name (bench/kernels.py would shadow our kernels package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _issue_us(fn, calls: int = 300) -> float:
    """Host microseconds per call with the GPU running behind (median of 5 batches, synced between)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def _stream_trace(mem, ns, out_dir: Path | None) -> dict:
    """Where the host time of a 50 %-streamed step goes, INT8 and bf16 (in some runs a streamed INT8 step's CPU
    issue time equalled its step time): per-block host time from the blocks' pre-hooks, and a torch.profiler
    table sorted by self CPU time (shows a CUDA runtime call that blocks, if one does)."""
    import time

    from comfyui_headroom.memory import enable_block_streaming

    out: dict = {}
    for int8 in (True, False):
        label = "int8" if int8 else "bf16"
        model = mem.build(ns, int8)
        x = torch.randn(1, ns.tokens, ns.hidden, device="cuda", dtype=torch.bfloat16)
        streamer = enable_block_streaming(model, "cuda", blocks="blocks", blocks_resident=ns.depth // 2,
                                          prefetch=2, order="spread")
        stamps: list[float] = []
        handles = [b.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
                   for b in model.blocks]
        step, issue = mem.step_time(model, x, ns.steps)
        stamps.clear()
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            t_end = time.perf_counter()
            torch.cuda.synchronize()
        per_block = [round((b - a) * 1e3, 3) for a, b in zip([t0] + stamps, stamps + [t_end])]
        streamed = streamer.streamed_indices
        out[label] = {"step_ms": step * 1e3, "issue_ms": issue * 1e3, "host_ms_before_block": per_block,
                      "streamed_blocks": streamed}
        print(f"{label} streamed 50%: step {step * 1e3:.1f} ms, issue {issue * 1e3:.1f} ms; host ms per block "
              f"{per_block}; streamed {streamed}", flush=True)
        if out_dir is not None:
            from torch.profiler import ProfilerActivity, profile

            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    model(x)
                torch.cuda.synchronize()
            out_dir.mkdir(parents=True, exist_ok=True)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            (out_dir / f"streamtrace_{label}_selfcpu.txt").write_text(table)
            prof.export_chrome_trace(str(out_dir / f"streamtrace_{label}.json"))
        for h in handles:
            h.remove()
        streamer.disable("cuda")
        del model, x
        mem._free()
    return out


def gpu(argv) -> int:
    import argparse as _argparse
    import datetime
    import json
    import types

    parser = _argparse.ArgumentParser(prog="dispatch_overhead.py gpu")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--parts", default="issue,resident,memory,kernels")
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    pkg = import_package()
    import triton
    from comfyui_headroom.kernels import int8_linear, reset_kernel_stats
    from comfyui_headroom.kernels.int8 import quantize_weight

    result = {"gpu": torch.cuda.get_device_name(0), "package": str(Path(pkg.__file__).resolve().parent),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                           "python": sys.version.split()[0]},
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python bench/dispatch_overhead.py gpu " + " ".join(argv)}
    print(json.dumps(result), flush=True)
    if "issue" in parts:
        issue = {}
        gen = torch.Generator().manual_seed(0)
        from comfyui_headroom.kernels import launch, plans

        for m in (1, 256, 4096):
            x = torch.randn(m, 3072, generator=gen).to("cuda", torch.bfloat16)
            w = (torch.randn(3072, 3072, generator=gen) * 0.02).to("cuda", torch.bfloat16)
            b = torch.zeros(3072, device="cuda", dtype=torch.bfloat16)
            qw, sw = quantize_weight(w, "rowwise")
            with torch.no_grad():
                for path in ("JITFunction.run", "direct launch", "launch plan") * 2:  # alternated: host speed drifts
                    launch.set_fast_launch(path != "JITFunction.run")
                    plans.set_enabled(path == "launch plan")
                    name = f"M={m} int8_linear {path}"
                    issue.setdefault(name, []).append(_issue_us(lambda: int8_linear(x, qw, sw, b)))
                plans.set_enabled(True)
                issue[f"M={m} F.linear bf16"] = [_issue_us(lambda: torch.nn.functional.linear(x, w, b))]
        issue = {name: min(values) for name, values in issue.items()}
        result["issue_us"] = issue
        print("issue us/call:", json.dumps(issue), flush=True)
    mem = _bench_module("memory")
    ns = types.SimpleNamespace(hidden=2048, depth=24, heads=16, tokens=4096, steps=5, profile=None)
    if "resident" in parts:
        model = mem.build(ns, True)
        x = torch.randn(1, ns.tokens, ns.hidden, device="cuda", dtype=torch.bfloat16)
        step, issue_s = mem.step_time(model, x, ns.steps)
        result["int8_resident"] = {"step_s": step, "issue_s": issue_s}
        print(f"INT8 resident: {step * 1e3:.2f} ms/step, CPU issue {issue_s * 1e3:.2f} ms", flush=True)
        if args.profile:  # where the host time of a step goes (cProfile, 3 steps)
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            with torch.no_grad():
                prof.enable()
                for _ in range(3):
                    model(x)
                prof.disable()
                torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
            args.profile.mkdir(parents=True, exist_ok=True)
            (args.profile / "cprofile_int8_resident.txt").write_text(text.getvalue())
        del model, x
        mem._free()
    if "memory" in parts:
        bw = mem.bandwidth()
        result["bandwidth"] = bw
        print("bandwidth:", json.dumps(bw), flush=True)
        result["streaming"] = []
        for int8 in (False, True):
            reset_kernel_stats()
            result["streaming"] += mem.streaming_rows(ns, int8, bw)
    if "streamtrace" in parts:
        result["streamtrace"] = _stream_trace(mem, ns, args.profile)
    if "kernels" in parts:
        kb = _bench_module("kernels")
        result["kernels_env"] = kb.environment()
        gen = torch.Generator().manual_seed(0)
        rows = []
        for m in (1, 4096):
            for k, n in kb.KN:
                row = kb.measure_shape(m, k, n, gen, {}, True)
                rows.append(row)
                print(f"M={m} K={k} N={n}: bf16 GPU {row['bf16_g']:.4f} ms, ours[{row['ours_kernel']}] GPU "
                      f"{row['ours_g']:.4f} ms ({row['bf16_g'] / row['ours_g']:.2f}x); eager bf16 "
                      f"{row['bf16_ms']:.4f} ms, ours {row['ours_ms']:.4f} ms ({row['bf16_ms'] / row['ours_ms']:.2f}x)",
                      flush=True)
        result["kernel_rows"] = rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:
        return gpu(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="cProfile the w8a8 stub path (top 25 by tottime)")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the package are imported: Triton paths eligible
    import_package()
    from comfyui_headroom.kernels import choose_kernel, force_kernel, kernel_summary, reset_kernel_stats
    from comfyui_headroom.kernels.backends import check_args
    from comfyui_headroom.quant import Int8Linear

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layer = Int8Linear.from_linear(torch.nn.Linear(16, 16), compute_dtype=torch.bfloat16)
    x = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    w, s, b = layer.weight, layer.weight_scale, layer.bias

    def dispatch():
        check_args(x, w, s, b, 128)
        return choose_kernel(x, w, s)

    results = {}
    with torch.no_grad():
        results["dispatch (check_args + choose_kernel)"] = _time_per_call(dispatch, args.calls)
        with force_kernel("reference"):
            results["Int8Linear.forward, reference, 16x16"] = _time_per_call(lambda: layer(x), args.calls // 2)
        saved = _stub_triton_kernels()
        try:
            for name in ("triton_w8a8", "triton_w8a16"):
                with force_kernel(name):
                    results[f"Int8Linear.forward, {name}, launches stubbed"] = _time_per_call(
                        lambda: layer(x), args.calls // 2)
            if args.profile:
                import cProfile
                import pstats

                with force_kernel("triton_w8a8"):
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(5000):
                        layer(x)
                    prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)
        reset_kernel_stats()
        with force_kernel("reference"):
            layer(x)
        assert kernel_summary()["reference"]["calls"] == 1, kernel_summary()
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {args.calls} calls, median of 5 runs")
    for name, us in results.items():
        print(f"  {name:55s} {us:8.2f} us/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
