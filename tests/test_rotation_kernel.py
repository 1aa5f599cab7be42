"""The fused rotate + quantize Triton kernel vs the reference, under TRITON_INTERPRET=1 (tiny shapes, subprocess)
and on a real GPU when there is one."""

import os
import subprocess
import sys
import textwrap

import pytest
from testutil import interpreter_unusable
import torch

CHECK = textwrap.dedent("""
    import torch
    from comfyui_headroom.kernels.hadamard import rotate_quantize_rows
    from comfyui_headroom.kernels.rotation import rotate_quantize_activation_reference

    def check(device):
        gen = torch.Generator().manual_seed(7)
        cases = [(16, 64, 20), (64, 128, 33), (256, 512, 17), (128, 256, 5), (32, 96, 1)]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for group, k, m in cases:
                x = torch.randn(m, k, generator=gen) * 3
                x[:, 5] *= 60.0                      # an outlier channel
                if m > 3:
                    x[2] = 0.0                       # an all-zero row: scale 1, q 0
                x = x.to(dtype).to(device)
                q, s = rotate_quantize_rows(x, group)
                qr, sr = rotate_quantize_activation_reference(x.cpu(), group)
                diff = (q.cpu().int() - qr.int()).abs()
                assert q.dtype == torch.int8 and s.dtype == torch.float32, (q.dtype, s.dtype)
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (dtype, group, k, m, diff.max())
                assert torch.allclose(s.cpu(), sr, rtol=1e-5), (dtype, group, k, m)
        # a strided view with contiguous rows works; a bad width is refused
        wide = torch.randn(8, 512, generator=gen).to(device)
        q, s = rotate_quantize_rows(wide[:, :256], 64)
        qr, sr = rotate_quantize_activation_reference(wide[:, :256].cpu(), 64)
        assert (q.cpu().int() - qr.int()).abs().max() <= 1
        try:
            rotate_quantize_rows(torch.randn(4, 100).to(device), 64)
        except ValueError as err:
            assert "multiple of the rotation group" in str(err)
        else:
            raise AssertionError("width 100 accepted")
        print("OK")
""")


ROTATED_LINEAR = textwrap.dedent("""
    import torch
    from comfyui_headroom.kernels import dispatch, hadamard, kernel_summary, reset_kernel_stats
    from comfyui_headroom.quant import Int8Linear, relative_error

    calls = []
    fused = hadamard.rotate_quantize_rows
    def counting(x, group, **kw):
        calls.append(tuple(x.shape))
        return fused(x, group, **kw)
    hadamard.rotate_quantize_rows = counting

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight[:, 3] *= 30.0                      # an outlier input channel
    layer = Int8Linear.from_linear(lin, rotation_group=64, compute_dtype=torch.float32)
    x = torch.randn(2, 10, 256, generator=gen)
    with torch.no_grad():
        exact = lin(x)
        reset_kernel_stats()
        with dispatch.force_kernel("triton_w8a8"):
            y = layer(x)                              # fused rotate+quantize, then the W8A8 GEMM
        assert calls == [(20, 256)], calls
        assert kernel_summary()["triton_w8a8"]["calls"] == 1
        with dispatch.force_kernel("reference"):
            y_ref = layer(x)                          # rotate, then the dequantize reference
        assert calls == [(20, 256)], calls            # the reference path does not use the fused kernel
    assert y.shape == exact.shape
    assert relative_error(y, exact) < 0.03, relative_error(y, exact)
    assert relative_error(y, y_ref) < 0.03
    print("OK")
""")


@pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
def test_rotated_int8linear_uses_the_fused_kernel_where_w8a8_runs():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", ROTATED_LINEAR], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
def test_fused_rotate_quantize_kernel_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported: new process
    proc = subprocess.run([sys.executable, "-c", CHECK + "\ncheck('cpu')\n"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_rotate_quantize_kernel_on_gpu():
    namespace: dict = {}
    exec(CHECK, namespace)
    namespace["check"]("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rotated_int8linear_forward_on_gpu():
    from comfyui_headroom.quant import Int8Linear, relative_error
    from testutil import outlier_weight

    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(1024, 768)
    with torch.no_grad():
        lin.weight.copy_(outlier_weight(768, 1024, gen) * 0.02)
    x = torch.randn(300, 1024, generator=gen)
    with torch.no_grad():
        exact = lin(x)
        for group in (64, 256):
            layer = Int8Linear.from_linear(lin, rotation_group=group, compute_dtype=torch.bfloat16).cuda()
            y = layer(x.cuda().to(torch.bfloat16)).float().cpu()
            assert relative_error(y, exact) < 0.03, group


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group,fused_expected", [(64, False), (256, False), (128, True)])
def test_bf16_rotated_layer_takes_the_measured_faster_path(group, fused_expected, monkeypatch):
    """bf16 on CUDA: groups 16/64/256 rotate with one tensor-core GEMM, then quantize (3x faster than the fused
    kernel on the H100); group 128 (a float32 rotation in torch) uses the fused kernel. Both stay within INT8 error."""
    from comfyui_headroom.kernels import hadamard
    from comfyui_headroom.quant import Int8Linear, relative_error

    calls = []
    fused = hadamard.rotate_quantize_rows

    def counting(x, g, **kw):
        calls.append(g)
        return fused(x, g, **kw)

    monkeypatch.setattr(hadamard, "rotate_quantize_rows", counting)
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(1024, 512)
    with torch.no_grad():
        lin.weight[:, 7] *= 30.0
    lin = lin.to("cuda", torch.bfloat16)
    layer = Int8Linear.from_linear(lin, rotation_group=group, compute_dtype=torch.bfloat16)
    x = torch.randn(300, 1024, generator=gen).to("cuda", torch.bfloat16)
    with torch.no_grad():
        y, exact = layer(x), lin(x)
    assert (calls == [group]) == fused_expected, calls
    assert relative_error(y.float(), exact.float()) < 0.03
