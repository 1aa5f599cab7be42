"""Run each Triton (and Gluon) kernel once on a modest shape, for ``compute-sanitizer`` (memcheck) on a GPU:

    compute-sanitizer --tool memcheck python tests/kernels_sanitize.py

Shapes are tile-unaligned so the masked edges and TMA out-of-bounds handling are exercised.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_headroom.kernels.triton_quant import quantize_rows  # noqa: E402
from comfyui_headroom.kernels.triton_w8a8 import w8a8_matmul  # noqa: E402
from comfyui_headroom.kernels.triton_w8a16 import w8a16_matmul  # noqa: E402
from kernels_check import check_quantize, check_w8a8, check_w8a16  # noqa: E402


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
    check_producers(gen, bf16)
    torch.cuda.synchronize()
    print("sanitize run: all kernels ran and matched their references")


def check_producers(gen, bf16) -> None:
    """The producer kernels on widths that are not powers of two (masked lanes), against their torch paths."""
    from comfyui_headroom.kernels import producers, triton_producers
    from comfyui_headroom.kernels.int8 import quantize_activation

    x = torch.randn(3, 37, 1000, generator=gen).to("cuda", bf16)
    y = torch.randn(3, 37, 1000, generator=gen).to("cuda", bf16)
    shift, scale, gate = torch.randn(3, 3000, generator=gen).to("cuda", bf16).chunk(3, dim=-1)
    q, s, x_new = triton_producers.norm_modulate_quantize(x.view(-1, 1000), shift, scale, 37, 1e-6,
                                                          y.view(-1, 1000), gate)
    h = torch.nn.functional.layer_norm(x_new.float(), (1000,), eps=1e-6).view(3, 37, 1000)
    _, s_ref = quantize_activation((h * (1 + scale.float()[:, None]) + shift.float()[:, None]).view(-1, 1000))
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=0)
    o = torch.randn(2, 5, 33, 96, generator=gen).to("cuda", bf16)
    rows = producers.quantize_heads(o)
    assert torch.equal(rows.q, quantize_rows(o.transpose(1, 2).reshape(66, 480).contiguous())[0])
    g = producers.gelu_quantize(torch.randn(5, 20000, generator=gen).to("cuda", bf16))  # the two-pass loop
    assert g.q.shape == (5, 20000)


if __name__ == "__main__":
    main()
