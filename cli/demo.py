"""``headroom demo``: see :mod:`comfyui_headroom.demo.run`."""

from __future__ import annotations

import argparse
import json

from ..demo.config import SIZES
from ..kernels.constants import METHODS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="make a small DiT, convert it to INT8, run it under a VRAM budget and compare with bf16",
        description="Creates a demo diffusion transformer (cached), converts it to INT8, loads it under a VRAM "
                    "budget, samples an image with flow matching and reports speed and quality against bf16.",
    )
    parser.add_argument("--size", choices=tuple(SIZES), default=None,
                        help="model size (default: small with a GPU, tiny on CPU)")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="VRAM for weights; blocks that do not fit stream from pinned RAM "
                             "(default on a GPU: half of the blocks stream)")
    parser.add_argument("--ram-budget-gb", type=float, default=None,
                        help="RAM for streamed INT8 blocks; the ones that do not fit are read from the INT8 file on "
                             "every step (the disk tier); the report compares the output with the run without it")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 8 on a GPU, 4 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and of the latent noise")
    parser.add_argument("--tokens", type=int, default=None,
                        help="image tokens, a perfect square (default: tiny 64, small 1024, 1b 4096)")
    parser.add_argument("--method", choices=METHODS, default="rowwise",
                        help="INT8 scale granularity (default rowwise)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--cache-dir", default=None,
                        help="where the demo checkpoints live (default $HEADROOM_CACHE/demo or "
                             "~/.cache/comfyui-headroom/demo)")
    parser.add_argument("--out", default=None, help="folder for the PNG images (default: the cache folder, see "
                                                     "--cache-dir); the report prints where they went")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on a GPU, run the blocks eagerly instead of replaying them from CUDA graphs")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo.run import DemoOptions, format_report, run_demo
    from . import UserError

    options = DemoOptions(
        size=args.size, device=args.device, budget_gb=args.budget_gb,
        steps=args.steps, seed=args.seed, tokens=args.tokens,
        method=args.method, cache_dir=args.cache_dir, out_dir=args.out, cuda_graphs=args.cuda_graphs,
        ram_budget_gb=args.ram_budget_gb,
    )
    try:
        report = run_demo(options)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0
