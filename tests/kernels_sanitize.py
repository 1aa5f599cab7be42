"""Run each Triton (and Gluon) kernel once on a modest shape, for ``compute-sanitizer`` (memcheck) on a GPU:

    compute-sanitizer --tool memcheck python tests/kernels_sanitize.py

Shapes are tile-unaligned so the masked edges and TMA out-of-bounds handling are exercised.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_check import check_quantize, check_w8a8, check_w8a16  # noqa: E402

from comfyui_headroom.kernels.triton_quant import quantize_rows  # noqa: E402
from comfyui_headroom.kernels.triton_w8a8 import w8a8_matmul  # noqa: E402
from comfyui_headroom.kernels.triton_w8a16 import w8a16_matmul  # noqa: E402


def main() -> None:
    gen = torch.Generator().manual_seed(7)
    bf16 = torch.bfloat16
    check_quantize(quantize_rows, 37, 3000, gen, bf16, "cuda")
    check_quantize(quantize_rows, 5, 20000, gen, bf16, "cuda")
    for m, n, k, method in [(300, 1000, 1024, "rowwise"), (300, 1000, 1024, "block"), (77, 333, 999, "tensorwise"),
                            (77, 333, 999, "block")]:
        check_w8a8(w8a8_matmul, quantize_rows, m, n, k, method, gen, bf16, True, 128, "cuda")
    if torch.cuda.get_device_capability()[0] == 9:  # 9 x 16 tiles of 128 x 256 fill an H100: the Gluon kernel
        check_w8a8(w8a8_matmul, quantize_rows, 1100, 3848, 1040, "rowwise", gen, bf16, True, 128, "cuda")
    for m, n, k, method in [(1, 1000, 1024, "rowwise"), (13, 333, 999, "block"), (200, 520, 4096, "tensorwise")]:
        check_w8a16(w8a16_matmul, m, n, k, method, gen, bf16, True, 128, "cuda")
    torch.cuda.synchronize()
    print("sanitize run: all kernels ran and matched their references")


if __name__ == "__main__":
    main()
