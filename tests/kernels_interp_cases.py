"""The Triton kernels themselves, run by Triton's CPU interpreter on tiny shapes.

Not collected by the normal test run (no ``test_`` prefix): tests/test_kernels_interp.py runs this file
in a subprocess with ``TRITON_INTERPRET=1``, which must be set before triton is imported. Tiles are
shrunk through ``configs.override`` (the interpreter runs every program in Python); the code paths are
the real ones: pointer kernel, persistent TMA-descriptor kernel, split-K W8A16, looped quantization.
"""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels_interp.py (TRITON_INTERPRET=1)"

from comfyui_headroom import kernels  # noqa: E402
from comfyui_headroom.kernels import configs  # noqa: E402
from comfyui_headroom.kernels.configs import GemmConfig, QuantConfig  # noqa: E402
from comfyui_headroom.kernels.support import KernelUnsupported  # noqa: E402
from comfyui_headroom.kernels.triton_quant import quantize_rows  # noqa: E402
from comfyui_headroom.kernels.triton_w8a8 import _pick_config, w8a8_matmul  # noqa: E402
from comfyui_headroom.kernels.triton_w8a16 import w8a16_matmul  # noqa: E402
from comfyui_headroom.quant import Int8Linear  # noqa: E402
from kernels_check import check_quantize, check_vs_float_layer, check_w8a8, check_w8a16  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
POINTER = GemmConfig(32, 32, 32, group_m=2, num_warps=4, num_stages=2)
TMA = GemmConfig(32, 32, 32, group_m=2, num_warps=4, num_stages=2, tma=True)
SMALL = GemmConfig(16, 32, 32, group_m=1, num_warps=4, num_stages=2)
GEMV = GemmConfig(1, 8, 32, group_m=1, num_warps=4, num_stages=2)
QUANT = QuantConfig(max_single_pass=128, loop_block=32, num_warps=4)


@pytest.fixture(autouse=True)
def tiny_tiles():
    with configs.override(w8a8=POINTER, w8a16=SMALL, quant=QUANT, tma=False, gemv=GEMV):
        yield


@pytest.mark.parametrize("m,k,dtype", [(1, 7, BF16), (6, 100, BF16), (4, 64, FP16), (3, 96, FP32), (3, 200, BF16)])
def test_quantize_matches_reference(m, k, dtype, gen):
    # k=200 > max_single_pass: the two-pass loop
    check_quantize(quantize_rows, m, k, gen, dtype)


@pytest.mark.parametrize(
    "m,n,k,method,has_bias,dtype,out_dtype",
    [
        (1, 64, 64, "rowwise", True, BF16, BF16),      # M = 1
        (37, 45, 99, "tensorwise", False, BF16, BF16),  # odd K, tile-unaligned M/N
        (37, 45, 99, "rowwise", True, FP32, FP32),
        (33, 40, 96, "block", True, FP32, FP32),        # block scales inside the K loop
        (20, 33, 77, "block", False, BF16, BF16),       # block + odd K (last block short)
        (9, 48, 64, "rowwise", True, FP16, FP16),
    ],
)
def test_w8a8_pointer_kernel(m, n, k, method, has_bias, dtype, out_dtype, gen):
    check_w8a8(w8a8_matmul, quantize_rows, m, n, k, method, gen, dtype, has_bias, block_size=32, out_dtype=out_dtype)


@pytest.mark.parametrize(
    "m,n,k,method,has_bias,dtype",
    [
        (1, 48, 64, "rowwise", True, BF16),
        (45, 40, 96, "block", True, FP32),   # persistent loop: 6 tiles on 4 programs
        (33, 24, 64, "tensorwise", False, FP16),
    ],
)
def test_w8a8_tma_kernel(m, n, k, method, has_bias, dtype, gen):
    with configs.override(w8a8=TMA, tma=True):
        qa = torch.zeros(m, k, dtype=torch.int8)
        assert _pick_config(qa.device, m, n, k, torch.empty(m, n, dtype=dtype), (qa,)).tma
        check_w8a8(w8a8_matmul, quantize_rows, m, n, k, method, gen, dtype, has_bias, block_size=32)


def test_tma_config_falls_back_to_pointer_kernel_for_odd_k():
    with configs.override(w8a8=TMA, tma=True):
        qa = torch.zeros(5, 99, dtype=torch.int8)
        assert not _pick_config(qa.device, 5, 32, 99, torch.empty(5, 32, dtype=BF16), (qa,)).tma


@pytest.mark.parametrize(
    "m,n,k,method,has_bias,dtype,split_k",
    [
        (1, 64, 64, "rowwise", True, BF16, None),
        (5, 45, 99, "tensorwise", False, FP16, None),  # odd K, unaligned N
        (17, 33, 100, "block", True, FP32, 1),
        (3, 40, 256, "block", True, BF16, 3),          # split-K partials
        (40, 32, 96, "rowwise", False, FP32, 2),       # M above one M tile
    ],
)
def test_w8a16_kernel(m, n, k, method, has_bias, dtype, split_k, gen):
    check_w8a16(w8a16_matmul, m, n, k, method, gen, dtype, has_bias, block_size=32, split_k=split_k)


@pytest.mark.parametrize(
    "n,k,method,has_bias,dtype",
    [
        (64, 64, "rowwise", True, BF16),
        (45, 99, "tensorwise", False, FP16),   # odd K (masked K tail), N not a multiple of the tile
        (40, 96, "block", True, BF16),         # per-32 block scales inside the K loop
        (8, 1000, "rowwise", False, FP32),
    ],
)
def test_w8a16_gemv_kernel_at_m1(n, k, method, has_bias, dtype, gen):
    """M = 1 takes the GEMV kernel (no MMA); the same reference and tolerances as the tiled kernel."""
    from comfyui_headroom.kernels import triton_w8a16

    calls = []
    original = triton_w8a16._launch_gemv
    triton_w8a16._launch_gemv = lambda *a, **kw: (calls.append(a[0]), original(*a, **kw))[1]
    try:
        check_w8a16(w8a16_matmul, 1, n, k, method, gen, dtype, has_bias, block_size=32)
    finally:
        triton_w8a16._launch_gemv = original
    assert calls == [(-(-n // GEMV.block_n),)]


@pytest.mark.parametrize("kernel", ["triton", "w8a16"])
def test_layer_vs_unquantized_on_normal_data(kernel, gen):
    with kernels.force_kernel(kernel):
        check_vs_float_layer(kernels.int8_linear, 16, 64, 128, gen, BF16)


def test_int8linear_uses_forced_triton_kernel_on_cpu(gen):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 32).to(BF16))
    x = torch.randn(2, 3, 64, generator=gen).to(BF16)
    kernels.reset_kernel_stats()
    with kernels.force_kernel("triton"):
        y = layer(x)
    with kernels.force_kernel("w8a16"):
        y16 = layer(x)
    summary = kernels.kernel_summary()
    assert summary["triton_w8a8"]["shapes"] == {"6x32x64": 1}
    assert summary["triton_w8a16"]["shapes"] == {"6x32x64": 1}
    assert y.shape == (2, 3, 32) and y16.shape == (2, 3, 32)
    ref = layer.dequantized_weight(torch.float64)
    exact = x.double() @ ref.T + layer.bias.double()
    assert float((y.double() - exact).norm() / exact.norm()) < 0.02


# ------------------------------------------------------------------ producers (kernels/triton_producers.py)

def _close_int8(rows, h: torch.Tensor) -> None:
    """A producer's INT8 vs per-row INT8 of the float64 value it should compute: scales equal to float32
    rounding, values within one step (a value within an ulp of a rounding edge may land either side)."""
    from comfyui_headroom.kernels.int8 import quantize_activation

    q_ref, s_ref = quantize_activation(h.float())
    torch.testing.assert_close(rows.scale, s_ref, rtol=1e-5, atol=0)
    diff = (rows.q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02


def _modulation(b, k, gen):
    """shift/scale/gate as a DiT's ``chunk`` views of one [B, 3K] tensor (row stride 3K)."""
    return (0.5 * torch.randn(b, 3 * k, generator=gen)).to(BF16).chunk(3, dim=-1)


@pytest.mark.parametrize("b,n,k,residual", [(2, 5, 96, False), (2, 5, 96, True), (1, 3, 128, True)])
def test_norm_modulate_quantize_kernel(b, n, k, residual, gen):
    from comfyui_headroom.kernels import producers

    x = (3 * torch.randn(b, n, k, generator=gen) + 1).to(BF16)
    y = torch.randn(b, n, k, generator=gen).to(BF16) if residual else None
    shift, scale, gate = _modulation(b, k, gen)
    rows, x_new = producers.norm_modulate_quantize(x, shift, scale, 1e-6, y=y, gate=gate if residual else None)
    base = x.double()
    if residual:
        expected_x = (x.double() + gate.double()[:, None] * y.double()).to(BF16)
        torch.testing.assert_close(x_new, expected_x, rtol=0.008, atol=0.008)  # one bf16 ulp
        base = x_new.double()
    h = torch.nn.functional.layer_norm(base, (k,), eps=1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    _close_int8(rows, h.reshape(b * n, k))


def test_quantize_heads_kernel_reads_the_transposed_rows(gen):
    from comfyui_headroom.kernels import producers
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    o = torch.randn(2, 3, 5, 32, generator=gen).to(BF16)  # [B, H, N, D] contiguous
    for view in (o, o.transpose(1, 2).contiguous().transpose(1, 2)):  # and the [B, N, H, D]-stored layout
        rows = producers.quantize_heads(view)
        q, s = quantize_rows(view.transpose(1, 2).reshape(10, 96).contiguous())
        assert torch.equal(rows.q, q) and torch.equal(rows.scale, s)


@pytest.mark.parametrize("approximate", ["tanh", "none"])  # Flux's GELU, Kandinsky 5's exact one
@pytest.mark.parametrize("k", [96, 200])  # 200 > QUANT.max_single_pass: the two-pass loop
def test_gelu_quantize_kernel(k, approximate, gen):
    from comfyui_headroom.kernels import producers

    x = (2 * torch.randn(7, k, generator=gen)).to(BF16)
    rows = producers.gelu_quantize(x, approximate)
    _close_int8(rows, torch.nn.functional.gelu(x.double(), approximate=approximate))


def test_producer_fed_layers_match_the_plain_block(gen):
    """The demo block's producer forward vs its plain forward, both on the interpreted W8A8 kernel."""
    from comfyui_headroom.demo.model import DemoConfig, DiTBlock
    from comfyui_headroom.quant.replace import quantize_model

    torch.manual_seed(0)
    block = DiTBlock(DemoConfig(hidden=64, depth=1, heads=2)).to(BF16)
    quantize_model(block, min_features=1, skip=[], keep_default_skips=False)
    x = torch.randn(1, 8, 64, generator=gen).to(BF16)
    c = torch.randn(1, 64, generator=gen).to(BF16)
    kernels.reset_kernel_stats()
    with torch.no_grad(), kernels.force_kernel("triton"):
        plain = block(x, c)
        block.int8_producers = True
        fused = block(x, c)
    assert kernels.kernel_summary()["triton_w8a8"]["shapes"]["8x192x64"] == 2  # qkv: once plain, once fed
    cos = torch.nn.functional.cosine_similarity(plain.double().flatten(), fused.double().flatten(), dim=0)
    assert float(cos) > 0.999


def _close_to_torch_path(rows, torch_rows) -> None:
    """A Triton producer vs the torch path of the same producer: scales to float32 rounding, values within one
    step (the two compute silu/rsqrt with different float32 roundings), almost all equal."""
    torch.testing.assert_close(rows.scale, torch_rows.scale, rtol=1e-5, atol=0)
    diff = (rows.q.int() - torch_rows.q.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02


def _torch_path(monkeypatch, fn, *args):
    from comfyui_headroom.kernels import producers

    with monkeypatch.context() as patch:
        patch.setattr(producers, "_triton_here", lambda t: False)
        return fn(*args)


@pytest.mark.parametrize("k", [96, 200])  # 200 > QUANT.max_single_pass: the kernel's two-pass loop
def test_silu_mul_quantize_kernel_on_halves_of_one_tensor(k, gen, monkeypatch):
    from comfyui_headroom.kernels import producers, triton_producers

    h = (2 * torch.randn(2, 5, 2 * k, generator=gen)).to(BF16)
    gate, up = h.chunk(2, dim=-1)  # row stride 2k each
    rows = producers.silu_mul_quantize(gate, up)
    expected = _torch_path(monkeypatch, producers.silu_mul_quantize, gate, up)
    _close_to_torch_path(rows, expected)
    _close_int8(rows, (torch.nn.functional.silu(gate.double()) * up.double()).reshape(10, k))
    # the kernel itself, one pass or two (never the torch fallback)
    _close_to_torch_path(producers.Int8Rows(*triton_producers.silu_mul_quantize(
        gate.reshape(10, k), up.reshape(10, k))), expected)


@pytest.mark.parametrize("gated,weights", [(True, True), (False, True), (True, False)])
def test_rms_norm_residual_scale_quantize_kernel(gated, weights, gen, monkeypatch):
    """Lumina 2 / Z-Image's seam: the kernel's new residual is the torch path's within the bf16 roundings of its four
    steps (the interpreter truncates float32 -> bf16 casts where a GPU rounds to nearest: a few steps), and its INT8
    rows are the torch path's of that residual."""
    from comfyui_headroom.kernels import producers

    x, y = ((2 * torch.randn(2, 5, 96, generator=gen)).to(BF16) for _ in range(2))
    mods = (0.5 * torch.randn(2, 4 * 96, generator=gen)).to(BF16).chunk(4, dim=-1)  # ComfyUI's chunk views
    scale, gate = mods[0], mods[1] if gated else None
    y_weight, weight = ((1 + 0.1 * torch.randn(96, generator=gen)).to(BF16) if weights else None for _ in range(2))
    rows, x_new = producers.rms_norm_residual_scale_quantize(x, y, y_weight, gate, weight, scale, 1e-6, 1e-5)
    torch_rows, torch_x = _torch_path(monkeypatch, producers.rms_norm_residual_scale_quantize, x, y, y_weight, gate,
                                      weight, scale, 1e-6, 1e-5)
    added = (torch_x.float() - x.float()).abs()  # |tanh(gate) * norm(y)|: a sum's rounding is relative to its parts
    step = (x.float().abs() + added) * 2.0 ** -7 + 2.0 ** -9  # one bf16 step of the larger part
    assert bool(((x_new.float() - torch_x.float()).abs() <= 4 * step).all())
    _close_to_torch_path(rows, _torch_path(monkeypatch, producers.rms_norm_scale_quantize, x_new, weight, scale, 1e-5))
    assert torch.equal(torch_rows.scale > 0, rows.scale > 0)


def test_silu_mul_quantize_kernel_on_two_tensors_of_different_row_strides(gen, monkeypatch):
    from comfyui_headroom.kernels import producers

    gate = (2 * torch.randn(7, 3 * 64, generator=gen)).to(BF16)[:, 64:128]  # row stride 192
    up = torch.randn(7, 64, generator=gen).to(BF16)  # row stride 64
    rows = producers.silu_mul_quantize(gate, up)
    _close_to_torch_path(rows, _torch_path(monkeypatch, producers.silu_mul_quantize, gate, up))


@pytest.mark.parametrize("silu_gate,f", [(False, 48), (True, 48), (False, 160)])  # 64 + 160 > max_single_pass
def test_heads_activation_quantize_kernel(silu_gate, f, gen, monkeypatch):
    """Flux's single block: attention heads [B, H, N, D] next to the MLP activation, read from a column slice of
    linear1's output (its row stride), as one INT8 row."""
    from comfyui_headroom.kernels import producers

    b, h, n, d = 2, 4, 5, 16
    o = torch.randn(b, n, h, d, generator=gen).to(BF16).transpose(1, 2)  # the layout attention returns
    width = 2 * f if silu_gate else f
    linear1_out = (2 * torch.randn(b, n, 3 * h * d + width, generator=gen)).to(BF16)
    mlp = linear1_out[..., 3 * h * d:]
    rows = producers.heads_activation_quantize(o, mlp, silu_gate)
    _close_to_torch_path(rows, _torch_path(monkeypatch, producers.heads_activation_quantize, o, mlp, silu_gate))
    m = mlp.double().reshape(b * n, width)
    act = (torch.nn.functional.silu(m[:, :f]) * m[:, f:]) if silu_gate else \
        torch.nn.functional.gelu(m, approximate="tanh")
    _close_int8(rows, torch.cat((o.double().transpose(1, 2).reshape(b * n, h * d), act), dim=-1))


@pytest.mark.parametrize("k,with_weight", [(96, True), (96, False), (200, True)])
def test_rms_norm_scale_quantize_kernel(k, with_weight, gen, monkeypatch):
    from comfyui_headroom.kernels import producers, triton_producers

    x = (3 * torch.randn(2, 5, k, generator=gen) + 1).to(BF16)
    weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(BF16) if with_weight else None
    scale = _modulation(2, k, gen)[1]  # a chunk view: row stride 3k
    rows = producers.rms_norm_scale_quantize(x, weight, scale, 1e-5)
    expected = _torch_path(monkeypatch, producers.rms_norm_scale_quantize, x, weight, scale, 1e-5)
    _close_to_torch_path(rows, expected)
    h = torch.nn.functional.rms_norm(x.double(), (k,), None if weight is None else weight.double(), 1e-5)
    _close_int8(rows, (h * (1 + scale.double()[:, None])).reshape(10, k))
    if k > QUANT.max_single_pass:
        with pytest.raises(KernelUnsupported):
            triton_producers.rms_norm_scale_quantize(x.reshape(10, k), weight, scale, 5, 1e-5)
        assert torch.equal(rows.q, expected.q) and torch.equal(rows.scale, expected.scale)
    else:
        q, s = triton_producers.rms_norm_scale_quantize(x.reshape(10, k), weight, scale, 5, 1e-5)
        _close_to_torch_path(producers.Int8Rows(q, s), expected)


def test_compiled_block_runs_the_producer_kernels_as_eager(gen):
    """torch.compile (aot_eager, fullgraph) of the producer-fed block on the interpreted Triton kernels: the
    custom ops run the same kernels as eager, so the output is the same bit for bit."""
    from comfyui_headroom.demo.model import DemoConfig, DiTBlock
    from comfyui_headroom.quant.replace import quantize_model

    torch.manual_seed(0)
    block = DiTBlock(DemoConfig(hidden=64, depth=1, heads=2)).to(BF16)
    quantize_model(block, min_features=1, skip=[], keep_default_skips=False)
    block.int8_producers = True
    x = torch.randn(1, 24, 64, generator=gen).to(BF16)
    c = torch.randn(1, 64, generator=gen).to(BF16)
    torch._dynamo.reset()
    with torch.no_grad(), kernels.force_kernel("triton"):
        eager = block(x, c)
        kernels.reset_kernel_stats()
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, c)
    torch._dynamo.reset()
    assert block.producer_forwards == 1  # eager took the producer path (compiled calls are not counted)
    assert kernels.kernel_summary()["triton_w8a8"]["shapes"]["24x192x64"] == 1  # qkv on INT8 rows, compiled
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("pe_batch,with_weights,heads", [(1, True, 3), (2, False, 10), (None, True, 2)])
def test_qk_norm_rope_kernel_writes_the_joint_sequence(pe_batch, with_weights, heads, gen):
    """The attention inputs of two streams (text, then image) through the Triton kernel, against ComfyUI's ops in
    torch. Within an ulp: the interpreter truncates float32 -> bf16 casts where a GPU rounds to nearest."""
    from comfyui_headroom.kernels import triton_attention_inputs
    from comfyui_headroom.kernels.attention_inputs import qk_norm_rope
    from test_attention_inputs import reference, rotation_matrices, stream

    b, d, lengths = 2, 16, (3, 5)
    streams = [stream(b, n, heads, d, gen) for n in lengths]
    weights = [tuple((1 + 0.1 * torch.randn(d, generator=gen)).to(BF16) if with_weights else None for _ in range(2))
               for _ in streams]
    pe = None if pe_batch is None else rotation_matrices(pe_batch, sum(lengths), d, gen)
    eps = 1e-6
    out = tuple(torch.full((b, heads, sum(lengths), d), float("nan"), dtype=BF16) for _ in range(3))
    calls = []
    launch = triton_attention_inputs._launch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_attention_inputs, "_launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
        offset = 0
        for (q, k, v), (wq, wk) in zip(streams, weights):
            qk_norm_rope(q, k, v, wq, wk, eps, eps, pe, out, offset)
            offset += q.shape[1]
    assert len(calls) == 2  # the kernel ran, not the torch path
    for got, want in zip(out, reference(streams, weights, eps, pe)):
        assert not got.isnan().any()
        ulp = 2 ** -7 * want.float().abs().amax(dim=-1, keepdim=True)  # of the head's largest value: a rotation
        assert ((got.float() - want.float()).abs() <= 2 * ulp).all()   # mixes a pair's two rounding errors
    assert torch.equal(out[2], reference(streams, weights, eps, pe)[2])  # v is copied, not computed
