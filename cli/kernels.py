"""``headroom kernels``: which INT8 kernel would run on this machine, per shape (registered by cli.py)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "kernels", help="show which INT8 kernel runs here for typical shapes (and why)",
        description="Print the device, torch/triton versions, the architecture family used for tile configs, "
                    "and the kernel the dispatcher picks for a few token counts and scale layouts.")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 256, 4096], help="M values to show")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run_kernels)


def describe(device_name: str | None = None, tokens=(1, 256, 4096)) -> dict:
    import torch

    from ..kernels.backends import HAS_TRITON, interpreting
    from ..kernels.configs import arch_of, w8a8_candidates, w8a16_candidates
    from ..kernels.dispatch import choose_kernel, forced_kernel, reload_env

    reload_env()  # a CLI reports the environment as it is now

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict = {"device": str(device), "torch": torch.__version__, "triton": None, "forced": forced_kernel(),
                  "interpreter": interpreting()}
    if HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    arch = arch_of(device)
    info["arch_family"] = arch
    info["w8a8_config"] = str(w8a8_candidates(arch)[0])
    info["w8a16_config"] = str(w8a16_candidates(arch)[0])
    choices = {}
    k, n = 3072, 3072
    weight = torch.empty(n, k, dtype=torch.int8, device="meta")
    for method, scale in (("rowwise", torch.empty(n, device="meta")), ("block", torch.empty(n, k // 128, device="meta"))):
        for m in tokens:
            x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
            x = _on(x, device)
            choices[f"M={m} {method}"] = choose_kernel(x, _on(weight, device), _on(scale, device))
    info["choices"] = choices
    return info


def _on(t, device):
    """A tiny stand-in with the right device/shape for the choice (no data is read)."""
    import torch

    return torch.empty_strided(t.shape, (0,) * t.ndim, dtype=t.dtype, device=device)


def run_kernels(args) -> int:
    info = describe(args.device, args.tokens)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key != "choices":
            print(f"{key:14s} {value}")
    print("kernel choice (K = N = 3072):")
    for shape, kernel in info["choices"].items():
        print(f"  {shape:22s} -> {kernel}")
    return 0
