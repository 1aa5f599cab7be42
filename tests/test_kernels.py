"""Kernel dispatcher, custom ops and torch.compile on the CPU (reference and torch._int_mm paths).

The Triton kernels themselves are tested under the interpreter (test_kernels_interp.py) and on a GPU
(test_kernels_gpu.py).
"""

import logging

import pytest
import torch
from comfyui_headroom import kernels
from comfyui_headroom.kernels import backends
from comfyui_headroom.kernels.int8 import quantize_activation, relative_error
from comfyui_headroom.quant import Int8Linear
from kernels_check import TOL, activations, w8a8_reference, weights


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    for var in ("HEADROOM_FORCE_KERNEL", "HEADROOM_DEBUG", "HEADROOM_LOG_KERNEL", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    kernels.reload_env()
    kernels.reset_kernel_stats()
    with kernels.force_kernel(None):
        yield
    kernels.reset_kernel_stats()
    monkeypatch.undo()
    kernels.reload_env()


def _layer(gen, in_f=64, out_f=48, method="rowwise", dtype=torch.float32):
    linear = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.05)
    return Int8Linear.from_linear(linear.to(dtype), method=method, block_size=32)


def test_cpu_default_is_reference_and_stats_count_shapes(gen):
    layer = _layer(gen)
    layer(torch.randn(2, 5, 64, generator=gen))
    layer(torch.randn(3, 64, generator=gen))
    layer(torch.randn(3, 64, generator=gen))
    assert kernels.kernel_summary() == {"reference": {"calls": 3, "shapes": {"10x48x64": 1, "3x48x64": 2}}}
    kernels.reset_kernel_stats()
    assert kernels.kernel_summary() == {}


def test_force_kernel_setter_and_context_manager():
    assert kernels.forced_kernel() is None
    with kernels.force_kernel("w8a16"):
        assert kernels.forced_kernel() == "triton_w8a16"
        with kernels.force_kernel("int_mm"):
            assert kernels.forced_kernel() == "int_mm"
        assert kernels.forced_kernel() == "triton_w8a16"
    assert kernels.forced_kernel() is None
    kernels.force_kernel("triton")  # plain setter
    assert kernels.forced_kernel() == "triton_w8a8"
    kernels.force_kernel("auto")
    assert kernels.forced_kernel() is None
    with pytest.raises(ValueError, match="unknown INT8 kernel 'fp4'.*w8a16"):
        kernels.force_kernel("fp4")


def test_env_forces_int_mm_which_matches_float64_on_quantized_operands(gen, monkeypatch):
    monkeypatch.setenv("HEADROOM_FORCE_KERNEL", "int_mm")
    kernels.reload_env()  # read once at import
    x = activations(40, 96, gen, torch.float32)
    _, qw, sw = weights(72, 96, gen, "rowwise", 128)
    bias = torch.randn(72, generator=gen)
    y = kernels.int8_linear(x, qw, sw, bias)
    qa, sa = quantize_activation(x)
    err = relative_error(y, w8a8_reference(qa, sa, qw, sw, bias, 128))
    assert err <= TOL[torch.float32]
    assert list(kernels.kernel_summary()) == ["int_mm"]


def test_python_override_beats_env(gen, monkeypatch):
    monkeypatch.setenv("HEADROOM_FORCE_KERNEL", "int_mm")
    kernels.reload_env()  # read once at import
    layer = _layer(gen)
    with kernels.force_kernel("reference"):
        layer(torch.randn(32, 64, generator=gen))
    assert list(kernels.kernel_summary()) == ["reference"]


@pytest.mark.parametrize("forced,method,m", [("triton", "rowwise", 32), ("int_mm", "block", 32), ("int_mm", "rowwise", 4)])
def test_forced_kernel_that_cannot_run_falls_back_with_a_warning(forced, method, m, gen, caplog):
    # triton on a CPU without TRITON_INTERPRET; int_mm with block scales or M <= 16
    layer = _layer(gen, method=method)
    x = torch.randn(m, 64, generator=gen)
    with caplog.at_level(logging.WARNING, logger="comfyui_headroom.kernels"), kernels.force_kernel(forced):
        y = layer(x)
    assert list(kernels.kernel_summary()) == ["reference"]
    torch.testing.assert_close(y, backends.reference(x, layer.weight, layer.weight_scale, layer.bias, 32))


def test_debug_mode_names_kernel_and_shape_on_nan(gen, monkeypatch):
    layer = _layer(gen)
    layer.weight_scale[3] = float("inf")
    x = torch.randn(4, 64, generator=gen)
    layer(x)  # no check without HEADROOM_DEBUG
    monkeypatch.setenv("HEADROOM_DEBUG", "1")
    kernels.reload_env()  # read once at import
    with pytest.raises(FloatingPointError, match=r"reference produced NaN/inf for x \(4, 64\).*\(48, 64\).*input was finite"):
        layer(x)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="input already had NaN"):
        layer(x)


def test_log_kernel_env_logs_each_shape_once(gen, monkeypatch, caplog):
    monkeypatch.setenv("HEADROOM_LOG_KERNEL", "1")
    kernels.reload_env()  # read once at import
    layer = _layer(gen, in_f=64, out_f=40)
    with caplog.at_level(logging.INFO, logger="comfyui_headroom.kernels"):
        layer(torch.randn(7, 64, generator=gen))
        layer(torch.randn(7, 64, generator=gen))
    lines = [r.getMessage() for r in caplog.records if "x [7, 64] @ W [40, 64]" in r.getMessage()]
    assert len(lines) == 1 and "reference" in lines[0]


def test_bad_inputs_raise_clear_errors(gen):
    layer = _layer(gen)
    with pytest.raises(ValueError, match=r"input has 63 features .* expects 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(ValueError, match="weight must be int8"):
        kernels.int8_linear(torch.randn(2, 64), layer.weight.float(), layer.weight_scale)
    with pytest.raises(ValueError, match="must be floating point"):
        kernels.int8_linear(torch.ones(2, 64, dtype=torch.int32), layer.weight, layer.weight_scale)


@pytest.mark.parametrize("name", ["int8_linear", "reference", "int_mm", "triton_w8a8", "triton_w8a16"])
def test_custom_ops_fake_implementations_give_shape_and_dtype(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.headroom, name)
    with FakeTensorMode():
        x = torch.empty(2, 9, 64, dtype=torch.bfloat16)
        w = torch.empty(40, 64, dtype=torch.int8)
        s = torch.empty(40, 2, dtype=torch.float32)
        y = op(x, w, s, None, 32)
        q, qs = torch.ops.headroom.quantize_activation(torch.empty(18, 64))
    assert y.shape == (2, 9, 40) and y.dtype == torch.bfloat16
    assert q.shape == (18, 64) and q.dtype == torch.int8 and qs.shape == (18,)


def test_reference_op_and_quantize_op_compute_the_real_thing(gen):
    layer = _layer(gen, method="block")
    x = torch.randn(5, 64, generator=gen)
    y = torch.ops.headroom.reference(x, layer.weight, layer.weight_scale, layer.bias, 32)
    exact = x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    assert relative_error(y, exact) < 1e-6
    q, s = torch.ops.headroom.quantize_activation(x)
    q_ref, s_ref = quantize_activation(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


class _Block(torch.nn.Module):
    """A small transformer-ish MLP block of INT8 layers (row-wise and block scales)."""

    def __init__(self, gen):
        super().__init__()
        self.up = _layer(gen, 64, 128)
        self.down = _layer(gen, 128, 64, method="block")
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def test_torch_compile_traces_int8_layers_without_graph_breaks(gen):
    block = _Block(gen)
    x = torch.randn(2, 8, 64, generator=gen)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    code = explained.graphs[0].code
    assert code.count("headroom.int8_linear") == 2, code

    eager = block(x)
    kernels.reset_kernel_stats()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    torch.testing.assert_close(compiled(x), eager)
    # stats are recorded inside the op at run time, so compiled calls count too
    assert kernels.kernel_summary()["reference"]["calls"] == 4


def test_gradient_flows_to_input_and_lora_through_int8_layer(gen):
    layer = _layer(gen)
    down = torch.randn(4, 64, generator=gen, requires_grad=True)
    up = torch.randn(48, 4, generator=gen, requires_grad=True)
    layer.lora.append((down, up, 0.5))
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    w = layer.dequantized_weight()
    y2 = torch.nn.functional.linear(x2, w, layer.bias.float()) + 0.5 * (x2 @ down.detach().T) @ up.detach().T
    y2.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    assert down.grad is not None and up.grad is not None


def test_cli_kernels_reports_choice_per_shape(capsys, monkeypatch):
    from comfyui_headroom.cli import main

    assert main(["kernels", "--device", "cpu", "--tokens", "1", "4096"]) == 0
    out = capsys.readouterr().out
    assert "M=4096 block" in out and "-> reference" in out and "arch_family" in out
    monkeypatch.setenv("HEADROOM_FORCE_KERNEL", "int_mm")
    kernels.reload_env()  # read once at import
    assert main(["kernels", "--device", "cpu", "--tokens", "4096", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["forced"] == "int_mm" and info["choices"]["M=4096 rowwise"] == "int_mm"
    assert info["choices"]["M=4096 block"] == "reference"  # int_mm cannot apply block scales
