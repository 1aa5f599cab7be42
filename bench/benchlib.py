"""What every bench script shares: import the package from a checkout, and record the versions of a run."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_package():
    """``comfyui_headroom``, installed or (on the device machine) from the checkout's parent folder."""
    try:
        import comfyui_headroom  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT.parent))
    import comfyui_headroom

    return comfyui_headroom


def versions(*packages: str) -> dict:
    """torch, CUDA and Python versions plus ``packages``' (None for one that is not installed)."""
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in packages:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


PERFORMANCE_MD = ROOT / "docs" / "PERFORMANCE.md"


def write_section(title: str, body: str, path: Path = PERFORMANCE_MD) -> None:
    """Replace the ``## title`` section of docs/PERFORMANCE.md (up to the next ``## ``) with ``body``; append
    the section when the file has none. Every bench script owns one section and touches nothing else."""
    doc = path.read_text(encoding="utf-8")
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: section + "\n", doc, count=1)
    else:
        doc = doc.rstrip() + "\n\n" + section
    path.write_text(doc.rstrip() + "\n", encoding="utf-8")


def add_demo_model_args(parser: argparse.ArgumentParser) -> None:
    """The options of every bench that samples the demo DiT (same defaults everywhere: 1b, 4096 tokens, 8 steps)."""
    parser.add_argument("--size", default="1b", choices=("tiny", "small", "1b"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)


def emit(result: dict, json_path: str | None) -> str:
    """Print a run's result as JSON and save it to ``json_path`` when given (what `write` reads back)."""
    text = json.dumps(result, indent=2)
    if json_path:
        Path(json_path).write_text(text)
    print(text)
    return text



def event_median_ms(fn, reps: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls: CUDA events around each call on a GPU (no L2 flush:
    what a model's step sees), ``perf_counter`` without CUDA."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms(fn, rep_ms: int = 60) -> float:
    """``triton.testing.do_bench`` median in ms (L2 flushed before each repetition)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=15, rep=rep_ms, return_mode="median"))


def graph_ms(fn, rep_ms: int = 60) -> float:
    """GPU time without Python/launch overhead: capture ``fn`` once in a CUDA graph and time its replays
    (still L2-flushed, so weights come from HBM as in a real model). What a model sees when the CPU runs
    ahead of the GPU."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, rep_ms)


def demo_bench_main(argv, *, description: str, script: str, title: str, run, render, add_run_args=None,
                    print_table: bool = False) -> int:
    """The command line every demo-model bench shares: ``run`` (the GPU measurement, JSON out; ``--device cpu``
    only smoke-tests the script) and ``write RESULT [--notes MD]`` (rewrites its PERFORMANCE.md section)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    add_demo_model_args(p_run)
    if add_run_args is not None:
        add_run_args(p_run)
    p_run.add_argument("--json", help="write the result here")
    p_run.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only smoke-tests the script")
    p_write = sub.add_parser("write")
    p_write.add_argument("result")
    p_write.add_argument("--notes", help="markdown appended after the table (analysis)")
    p_write.add_argument("--doc", default=str(PERFORMANCE_MD), help="the file to rewrite")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        body = render(json.loads(Path(args.result).read_text()))
        if args.notes:
            body += "\n" + Path(args.notes).read_text().strip() + "\n"
        write_section(title, body, Path(args.doc))
        print(f"wrote the {title} section of {args.doc}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/{script} run needs a CUDA GPU (--device cpu only smoke-tests it)", file=sys.stderr)
        return 2
    result = run(args)
    emit(result, args.json)
    if print_table:
        print(render(result))
    return 0
