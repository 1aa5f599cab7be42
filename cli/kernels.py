"""``headroom kernels``: which INT8 kernel would run on this machine, per shape, and why (registered by cli.py)."""

from __future__ import annotations

import json

MAX_TOKENS = 1 << 24


def _tokens(text: str) -> int:
    """One ``--tokens`` value; UserError (one line) unless it is a whole number from 1 to :data:`MAX_TOKENS`."""
    from . import UserError

    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--tokens {text!r} is not a whole number of tokens (M), e.g. --tokens 1 256 4096") from None
    if not 1 <= value <= MAX_TOKENS:
        raise UserError(f"--tokens {value}: M must be from 1 to {MAX_TOKENS}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "kernels", help="show which INT8 kernel runs here for typical shapes (and why)",
        description="Print the device, torch/triton versions and, for a few token counts and scale layouts, the "
                    "kernel the dispatcher picks and why; the tile configs of the Triton kernels that would run.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--tokens", nargs="+", default=["1", "256", "4096"], metavar="M",
                        help="M values to show (1 to 16M; default 1 256 4096)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run_kernels)


# Where a Triton kernel takes its tile configs from (kernels/configs.py), and how to label them.
_TILES = {"triton_w8a8": (("w8a8_candidates", "Triton"), ("ws_candidates", "Gluon warp-specialized")),
          "triton_w8a16": (("w8a16_candidates", "Triton"),)}


def describe(device_name: str | None = None, tokens=(1, 256, 4096)) -> dict:
    """What ``headroom kernels`` prints. ValueError for a device this machine does not have or an unknown
    ``HEADROOM_FORCE_KERNEL``."""
    import torch

    from ..kernels import configs
    from ..kernels.backends import HAS_TRITON, interpreting
    from ..kernels.dispatch import check_device, env_problem, explain_kernel, forced_kernel, reload_env

    reload_env()  # a CLI reports the environment as it is now
    if env_problem():
        raise ValueError(env_problem())
    device = check_device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict = {"device": str(device), "torch": torch.__version__, "triton": None, "forced": forced_kernel(),
                  "interpreter": interpreting()}
    if HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    arch = configs.arch_of(device)
    info["arch_family"] = arch
    choices, why = {}, {}
    k, n = 3072, 3072
    weight = torch.empty(n, k, dtype=torch.int8, device="meta")
    for method, scale in (("rowwise", torch.empty(n, device="meta")), ("block", torch.empty(n, k // 128, device="meta"))):
        for m in tokens:
            x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
            key = f"M={m} {method}"
            choices[key], why[key] = explain_kernel(_on(x, device), _on(weight, device), _on(scale, device))
    info["choices"] = choices
    info["why"] = why
    # Tile configs only for the Triton kernels that run here (a GPU, or Triton's CPU interpreter).
    info["tiles"] = {kernel: [f"{label}: {cfg}" for source, label in _TILES[kernel]
                              for cfg in getattr(configs, source)(arch)]
                     for kernel in sorted(set(choices.values()) & set(_TILES))}
    return info


def _on(t, device):
    """A tiny stand-in with the right device/shape for the choice (no data is read)."""
    import torch

    return torch.empty_strided(t.shape, (0,) * t.ndim, dtype=t.dtype, device=device)


def run_kernels(args) -> int:
    from . import UserError

    tokens = [_tokens(t) for t in args.tokens]
    try:
        info = describe(args.device, tokens)
    except ValueError as err:
        raise UserError(f"--device {args.device}: {err}" if args.device and "HEADROOM_" not in str(err) else str(err)) \
            from None
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key not in ("choices", "why", "tiles"):
            print(f"{key:14s} {value}")
    print("kernel choice (K = N = 3072):")
    for shape, kernel in info["choices"].items():
        print(f"  {shape:16s} -> {kernel:13s} {info['why'][shape]}")
    if info["tiles"]:
        print(f"tile configs ({info['arch_family']}; each shape runs one of these):")
        for kernel, tiles in info["tiles"].items():
            for tile in tiles:
                print(f"  {kernel:13s} {tile}")
    else:
        print("tile configs: none (no Triton kernel runs here)")
    return 0
