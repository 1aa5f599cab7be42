"""Producers (kernels/producers.py): ops that write a W8A8 layer's input in INT8, and the layers that take it.

CPU: the torch path of every producer against float64 math, ``Int8Linear.forward_int8`` against the layer's own
forward, and the demo block fed by producers against its plain forward (``_int_mm`` runs on the CPU).
CUDA: the Triton producers and the fed block on the GPU (the interpreter runs the same kernels in
tests/kernels_interp_cases.py).
"""

import pytest
import torch
import torch.nn.functional as F
from comfyui_headroom import kernels
from comfyui_headroom.demo.model import DemoConfig, DemoDiT, DiTBlock
from comfyui_headroom.kernels import producers
from comfyui_headroom.kernels.int8 import quantize_activation
from comfyui_headroom.quant import Int8Linear
from comfyui_headroom.quant.linear import takes_int8_input
from comfyui_headroom.quant.replace import quantize_model

BF16 = torch.bfloat16
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_rows(rows, h: torch.Tensor) -> None:
    """INT8 rows vs per-row INT8 of the float64 value they stand for: scales to float32 rounding, values
    within one step (a value near a rounding edge may land either side), almost all equal."""
    q_ref, s_ref = quantize_activation(h.float())
    torch.testing.assert_close(rows.scale.cpu(), s_ref.cpu(), rtol=1e-5, atol=0)
    diff = (rows.q.cpu().int() - q_ref.cpu().int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def _inputs(b, n, k, gen, device="cpu"):
    x = (3 * torch.randn(b, n, k, generator=gen) + 1).to(BF16)
    y = torch.randn(b, n, k, generator=gen).to(BF16)
    shift, scale, gate = (0.5 * torch.randn(b, 3 * k, generator=gen)).to(BF16).chunk(3, dim=-1)  # chunk views
    return [t.to(device) for t in (x, y, shift, scale, gate)]


def _expected(x, y, shift, scale, gate, eps=1e-6):
    """float64 math of norm_modulate_quantize: (x_new or None, h rows)."""
    x_new = (x.double() + gate.double()[:, None] * y.double()).to(BF16) if y is not None else None
    base = (x_new if y is not None else x).double()
    h = F.layer_norm(base, (x.shape[-1],), eps=eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    return x_new, h.reshape(-1, x.shape[-1])


def _check_norm_modulate(b, n, k, residual, gen, device="cpu"):
    x, y, shift, scale, gate = _inputs(b, n, k, gen, device)
    rows, x_new = producers.norm_modulate_quantize(x, shift, scale, y=y if residual else None,
                                                   gate=gate if residual else None)
    expected_x, h = _expected(x, y if residual else None, shift, scale, gate)
    _check_rows(rows, h)
    if residual:
        torch.testing.assert_close(x_new, expected_x, rtol=0.008, atol=0.008)  # one bf16 ulp
    else:
        assert x_new is None


@pytest.mark.parametrize("residual", [False, True])
def test_norm_modulate_quantize_torch_path(residual, gen):
    _check_norm_modulate(2, 6, 64, residual, gen)


def test_norm_modulate_quantize_rejects_bad_modulation_shapes(gen):
    x, y, shift, scale, gate = _inputs(2, 4, 32, gen)
    with pytest.raises(ValueError, match="shift must be \\[2, 32\\]"):
        producers.norm_modulate_quantize(x, shift[:1], scale)
    with pytest.raises(ValueError, match="come with a gate"):
        producers.norm_modulate_quantize(x, shift, scale, y=y)


def test_quantize_heads_and_gelu_torch_paths(gen):
    o = torch.randn(2, 3, 5, 16, generator=gen).to(BF16)
    rows = producers.quantize_heads(o)
    q, s = quantize_activation(o.transpose(1, 2).reshape(10, 48))
    assert torch.equal(rows.q, q) and torch.equal(rows.scale, s)
    x = (2 * torch.randn(4, 3, 40, generator=gen)).to(BF16)
    _check_rows(producers.gelu_quantize(x), F.gelu(x.double(), approximate="tanh").reshape(12, 40))
    _check_rows(producers.gelu_quantize(x, "none"), F.gelu(x.double()).reshape(12, 40))
    with pytest.raises(ValueError, match="approximate='erf'"):
        producers.gelu_quantize(x, "erf")


def test_silu_mul_and_rms_norm_scale_torch_paths(gen):
    h = (2 * torch.randn(3, 7, 2 * 96, generator=gen)).to(BF16)
    gate, up = h.chunk(2, dim=-1)  # the two halves of one tensor, as Flux 2's SiLU gate splits them
    _check_rows(producers.silu_mul_quantize(gate, up), (F.silu(gate.double()) * up.double()).reshape(-1, 96))
    x, _, _, scale, _ = _inputs(2, 9, 64, gen)
    weight = (1 + 0.1 * torch.randn(64, generator=gen)).to(BF16)
    h = F.rms_norm(x.double(), (64,), weight.double(), 1e-5) * (1 + scale.double()[:, None])
    _check_rows(producers.rms_norm_scale_quantize(x, weight, scale, 1e-5), h.reshape(-1, 64))
    with pytest.raises(ValueError, match="must match"):
        producers.silu_mul_quantize(gate, up[:, :3])
    with pytest.raises(ValueError, match=r"scale must be \[2, 64\]"):
        producers.rms_norm_scale_quantize(x, weight, scale[:1], 1e-5)


@pytest.mark.parametrize("gated", [True, False])  # Z-Image's modulated blocks, its unmodulated refiners
def test_rms_norm_residual_scale_torch_path_is_comfyuis_seam(gated, gen):
    """The new residual is what ComfyUI's ops give, bit for bit (``x + gate.tanh() * norm2(out)`` in bf16), and
    the rows are ``rms_norm_scale_quantize`` of it."""
    x, y, _, scale, gate = _inputs(2, 9, 64, gen)
    y_weight, weight = ((1 + 0.1 * torch.randn(64, generator=gen)).to(BF16) for _ in range(2))
    rows, x_new = producers.rms_norm_residual_scale_quantize(x, y, y_weight, gate if gated else None, weight,
                                                              scale, 1e-6, 1e-5)
    t = F.rms_norm(y, (64,), y_weight, 1e-6)
    expected = x + (gate.unsqueeze(1).tanh() * t if gated else t)
    assert x_new.dtype == BF16 and torch.equal(x_new, expected)
    h = F.rms_norm(expected.double(), (64,), weight.double(), 1e-5) * (1 + scale.double()[:, None])
    _check_rows(rows, h.reshape(-1, 64))
    with pytest.raises(ValueError, match="y .* must match x"):
        producers.rms_norm_residual_scale_quantize(x, y[:, :3], y_weight, gate, weight, scale)
    with pytest.raises(ValueError, match=r"gate must be \[2, 64\]"):
        producers.rms_norm_residual_scale_quantize(x, y, y_weight, gate[:1], weight, scale)


def test_forward_int8_is_the_layers_gemm_on_its_own_quantization(gen):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).to(BF16))
    x = torch.randn(32, 64, generator=gen).to(BF16)
    with kernels.force_kernel("int_mm"):  # _int_mm runs on the CPU too: the same GEMM both ways
        assert torch.equal(layer.forward_int8(producers.Int8Rows(*quantize_activation(x)), BF16), layer(x))
    with pytest.raises(ValueError, match=r"expected int8 rows \[M, 64\]"):
        layer.forward_int8(producers.Int8Rows(*quantize_activation(x[:, :32])), BF16)
    with pytest.raises(ValueError, match=r"float32 scales \[M\]"):
        layer.forward_int8(producers.Int8Rows(*quantize_activation(x))._replace(scale=torch.ones(3)), BF16)
    layer.lora.append((torch.zeros(2, 64), torch.zeros(48, 2), 1.0))
    with pytest.raises(ValueError, match="LoRA"):
        layer.forward_int8(producers.Int8Rows(*quantize_activation(x)), BF16)


def test_takes_int8_input_only_where_a_w8a8_gemm_runs(gen):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).to(BF16))
    x = torch.randn(32, 64, generator=gen).to(BF16)
    assert not takes_int8_input(layer, x)  # CPU, automatic choice: the reference kernel
    with kernels.force_kernel("int_mm"):
        assert takes_int8_input(layer, x)
        assert not takes_int8_input(torch.nn.Linear(64, 48), x)
        assert not takes_int8_input(layer, x[:4])  # M <= 16: _int_mm cannot, the reference runs
        layer.lora.append((torch.zeros(2, 64), torch.zeros(48, 2), 1.0))
        assert not takes_int8_input(layer, x)


def _tiny_int8_block(device="cpu"):
    torch.manual_seed(0)
    block = DiTBlock(DemoConfig(hidden=128, depth=1, heads=2)).to(BF16)
    quantize_model(block, min_features=1, skip=[], keep_default_skips=False)
    return block.to(device)


def _cosine(a, b) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def test_demo_block_fed_by_producers_matches_its_plain_forward(gen):
    block = _tiny_int8_block()
    x = torch.randn(2, 24, 128, generator=gen).to(BF16)
    c = torch.randn(2, 128, generator=gen).to(BF16)
    kernels.reset_kernel_stats()
    with torch.no_grad(), kernels.force_kernel("int_mm"):
        plain = block(x, c)
        block.int8_producers = True
        fed = block(x, c)
    assert kernels.kernel_summary()["int_mm"]["shapes"]["48x384x128"] == 2  # qkv ran once each way
    assert _cosine(plain, fed) > 0.9999
    with torch.no_grad():  # automatic choice on the CPU (reference kernel): the plain forward, bit for bit
        block.int8_producers = False
        auto_plain = block(x, c)
        block.int8_producers = True
        assert torch.equal(block(x, c), auto_plain)


@CUDA
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("k", [3072, 5120])
def test_triton_norm_modulate_quantize_on_gpu(residual, k, gen):
    _check_norm_modulate(2, 300, k, residual, gen, "cuda")


@CUDA
def test_triton_quantize_heads_and_gelu_on_gpu(gen):
    from comfyui_headroom.kernels.triton_quant import quantize_rows

    o = torch.randn(2, 24, 257, 128, generator=gen).to(BF16).cuda()
    for view in (o, o.transpose(1, 2).contiguous().transpose(1, 2)):
        rows = producers.quantize_heads(view)
        q, s = quantize_rows(view.transpose(1, 2).reshape(2 * 257, 3072).contiguous())
        assert torch.equal(rows.q, q) and torch.equal(rows.scale, s)
    x = (2 * torch.randn(300, 12288, generator=gen)).to(BF16).cuda()
    _check_rows(producers.gelu_quantize(x), F.gelu(x.double(), approximate="tanh"))
    _check_rows(producers.gelu_quantize(x, "none"), F.gelu(x.double()))


@CUDA
def test_demo_model_fed_by_producers_on_gpu(gen):
    """The whole demo model on the GPU (automatic kernels): producers change the output by INT8 rounding only."""
    torch.manual_seed(0)
    cfg = DemoConfig(hidden=1024, depth=2, heads=8, latent_size=32)
    model = DemoDiT(cfg).to(BF16).cuda()
    lat = torch.randn(1, cfg.latent_channels, 32, 32, generator=gen).cuda()
    t = torch.full((1,), 0.4, device="cuda")
    with torch.no_grad():
        ref = model(lat, t)
        quantize_model(model)
        kernels.reset_kernel_stats()
        plain = model(lat, t)
        assert model.use_int8_producers() == 2
        fed = model(lat, t)
    assert _cosine(plain, fed) > 0.9999 and _cosine(fed, ref) > 0.999
    summary = kernels.kernel_summary()
    assert summary["triton_w8a8"]["shapes"]["256x3072x1024"] == 4  # qkv of 2 blocks, plain and fed


@CUDA
@pytest.mark.parametrize("k", [3072, 9216, 18432])  # 18432 (Flux 2's MLP): past one pass, the two-pass loop
def test_triton_silu_mul_quantize_on_gpu(k, gen):
    h = (2 * torch.randn(2, 300, 2 * k, generator=gen)).to(BF16).cuda()
    gate, up = h.chunk(2, dim=-1)  # the two halves of one tensor: row stride 2k
    _check_rows(producers.silu_mul_quantize(gate, up), (F.silu(gate.double()) * up.double()).reshape(-1, k))


@CUDA
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("k", [2304, 3840])
def test_triton_rms_norm_scale_quantize_on_gpu(k, with_weight, gen):
    x, _, _, scale, _ = _inputs(2, 300, k, gen, "cuda")
    weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(BF16).cuda() if with_weight else None
    h = F.rms_norm(x.double(), (k,), None if weight is None else weight.double(), 1e-5) * (1 + scale.double()[:, None])
    _check_rows(producers.rms_norm_scale_quantize(x, weight, scale, 1e-5), h.reshape(-1, k))


def test_tencent_silu_gate_is_silu_mul_with_halves_swapped(gen):
    """HunyuanImage-3's shared expert under torch.compile takes ``silu_mul_quantize`` (a custom op) instead of the
    grouped module's ``silu_gate_quantize`` (x1 * silu(x2)): the two give the same INT8 rows."""
    from comfyui_headroom.kernels.grouped import silu_gate_quantize

    h = (3 * torch.randn(40, 2 * 80, generator=gen)).to(BF16)
    a, b = silu_gate_quantize(h), producers.silu_mul_quantize(h[:, 80:], h[:, :80])
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("silu_gate", [False, True])
def test_heads_activation_quantize_torch_path(silu_gate, gen):
    o = torch.randn(2, 3, 7, 32, generator=gen).to(BF16)
    mlp = (2 * torch.randn(2, 7, 80, generator=gen)).to(BF16)
    m = mlp.double().reshape(14, 80)
    act = torch.nn.functional.silu(m[:, :40]) * m[:, 40:] if silu_gate else F.gelu(m, approximate="tanh")
    rows = producers.heads_activation_quantize(o, mlp, silu_gate)
    assert rows.q.shape == (14, 96 + act.shape[1])
    _check_rows(rows, torch.cat((o.double().transpose(1, 2).reshape(14, 96), act), dim=-1))
    with pytest.raises(ValueError, match="must be"):
        producers.heads_activation_quantize(o, mlp[:, :3])
