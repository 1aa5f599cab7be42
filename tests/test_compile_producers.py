"""Producers under ``torch.compile``: compiled graphs keep them as ``headroom::*`` custom ops (kernels/ops.py).

CPU only, backend ``aot_eager`` (no C++ compiler needed): what dynamo traces is what inductor would get. The W8A8
choice on the CPU is the reference kernel, which takes no INT8 input; ``force_kernel("int_mm")`` (``_int_mm`` runs
on the CPU) makes the producer path the one eager takes, and the compiled one must follow it.
"""

import pytest
import torch
import torch.nn.functional as F
from comfyui_headroom import kernels
from comfyui_headroom.demo.model import DemoConfig, DiTBlock
from comfyui_headroom.kernels import producers
from comfyui_headroom.kernels.int8 import quantize_activation
from comfyui_headroom.quant import Int8Linear
from comfyui_headroom.quant.replace import quantize_model

BF16 = torch.bfloat16
PRODUCER_OPS = {"norm_modulate_quantize", "norm_modulate_quantize_residual", "quantize_heads", "gelu_quantize"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """A dynamo backend that keeps the ``headroom`` ops of every graph it gets, then runs it as aot_eager."""

    def __init__(self):
        self.graphs: list[list[str]] = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append([str(n.target).split(".")[1] for n in gm.graph.nodes
                            if n.op == "call_function" and str(n.target).startswith("headroom.")])
        return aot_eager(gm, example_inputs)


def _int8_block():
    torch.manual_seed(0)
    block = DiTBlock(DemoConfig(hidden=128, depth=1, heads=2)).to(BF16)
    quantize_model(block, min_features=1, skip=[], keep_default_skips=False)
    block.int8_producers = True
    return block


def _block_inputs(gen, tokens=24):
    return torch.randn(2, tokens, 128, generator=gen).to(BF16), torch.randn(2, 128, generator=gen).to(BF16)


def test_compiled_demo_block_keeps_producers_and_equals_eager(gen):
    block, recorder = _int8_block(), GraphRecorder()
    x, c = _block_inputs(gen)
    with torch.no_grad(), kernels.force_kernel("int_mm"):
        eager = block(x, c)
        assert block.producer_forwards == 1  # eager took the producer path
        compiled = torch.compile(block, backend=recorder, fullgraph=True)(x, c)
    (ops,) = recorder.graphs
    assert PRODUCER_OPS <= set(ops)
    assert ops.count("int8_linear_int8_input") == 4  # qkv, proj, fc1, fc2 on INT8 rows
    assert ops.count("int8_linear") == 1  # the modulation Linear (M = 2 rows) keeps the float input
    assert torch.equal(compiled, eager)
    assert block.producer_forwards == 1  # not counted under compile (the count would be a recompiling guard)


def test_compiled_block_decides_as_eager_and_recompiles_when_the_kernel_changes(gen):
    """Automatic choice on the CPU = reference: eager and compiled both take the plain forward; forcing
    ``_int_mm`` afterwards recompiles into the producer path (the forced kernel is guarded, not baked in)."""
    block, recorder = _int8_block(), GraphRecorder()
    x, c = _block_inputs(gen)
    compiled = torch.compile(block, backend=recorder, fullgraph=True)
    with torch.no_grad():
        plain = compiled(x, c)
        assert torch.equal(plain, block(x, c)) and block.producer_forwards == 0
        with kernels.force_kernel("int_mm"):
            fed = compiled(x, c)
            assert torch.equal(fed, block(x, c))
    assert len(recorder.graphs) == 2
    assert not PRODUCER_OPS & set(recorder.graphs[0]) and recorder.graphs[0].count("int8_linear") == 5
    assert PRODUCER_OPS <= set(recorder.graphs[1])


def test_dynamic_token_count_compiles_once_with_producers(gen):
    """Dynamic shapes: a new token count takes the same graph (the kernel choice is one guard on M, no
    specialization). The first call may trace twice (AOT tracing can specialize a size and restart dynamo)."""
    block, recorder = _int8_block(), GraphRecorder()
    compiled = torch.compile(block, backend=recorder, fullgraph=True, dynamic=True)
    with torch.no_grad(), kernels.force_kernel("int_mm"):
        for tokens in (24, 40, 56):  # none equal to another size (duck shaping would recompile)
            x, c = _block_inputs(gen, tokens)
            assert torch.equal(compiled(x, c), block(x, c))
            if tokens == 24:
                first_call_graphs = len(recorder.graphs)
    assert len(recorder.graphs) == first_call_graphs and PRODUCER_OPS <= set(recorder.graphs[-1])


@pytest.mark.parametrize("rows,forced,lora,expected", [
    (32, "int_mm", False, True),
    (8, "int_mm", False, False),   # M <= 16: _int_mm cannot, the reference would run
    (32, None, False, False),      # automatic on the CPU: reference
    (32, "int_mm", True, False),   # a LoRA branch needs the float input
])
def test_takes_int8_input_under_compile_equals_eager(rows, forced, lora, expected, gen):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).to(BF16))
    if lora:
        layer.lora.append((torch.zeros(2, 64), torch.zeros(48, 2), 1.0))
    x = torch.randn(rows, 64, generator=gen).to(BF16)

    def decide(t):
        return layer.takes_int8_input(t), t + 1  # a tensor output: a graph to compile

    with kernels.force_kernel(forced):
        eager = layer.takes_int8_input(x)
        compiled = torch.compile(decide, backend="aot_eager", fullgraph=True)(x)[0]
    assert eager == compiled == expected


def test_silu_mul_and_rms_norm_producers_compile_to_their_ops(gen):
    recorder = GraphRecorder()
    h = (2 * torch.randn(2, 7, 192, generator=gen)).to(BF16)
    x = torch.randn(2, 7, 64, generator=gen).to(BF16)
    weight = (1 + 0.1 * torch.randn(64, generator=gen)).to(BF16)
    scale = (0.5 * torch.randn(2, 64, generator=gen)).to(BF16)

    def both(h, x, weight, scale):
        gate, up = h.chunk(2, dim=-1)
        rows, x_new = producers.rms_norm_residual_scale_quantize(x, x, weight, scale, None, scale, 1e-6, 1e-5)
        return (*producers.silu_mul_quantize(gate, up), *producers.rms_norm_scale_quantize(x, weight, scale, 1e-5),
                *producers.rms_norm_scale_quantize(x, None, scale, 1e-5), *rows, x_new)

    compiled = torch.compile(both, backend=recorder, fullgraph=True)(h, x, weight, scale)
    for got, want in zip(compiled, both(h, x, weight, scale), strict=True):
        assert torch.equal(got, want)
    assert sorted(recorder.graphs[0]) == ["rms_norm_residual_scale_quantize", "rms_norm_scale_quantize",
                                          "rms_norm_scale_quantize", "silu_mul_quantize"]


def _op_samples(gen):
    """(op, args) for every producer op and the GEMM on INT8 rows; modulation as ``chunk`` views."""
    x = (3 * torch.randn(2, 5, 64, generator=gen) + 1).to(BF16)
    y = torch.randn(2, 5, 64, generator=gen).to(BF16)
    shift, scale, gate = (0.5 * torch.randn(2, 192, generator=gen)).to(BF16).chunk(3, dim=-1)
    halves = (2 * torch.randn(2, 5, 128, generator=gen)).to(BF16).chunk(2, dim=-1)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).to(BF16))
    q, s = quantize_activation(x.reshape(10, 64))
    ops = torch.ops.headroom
    return [
        (ops.norm_modulate_quantize, (x, shift, scale, 1e-6)),
        (ops.norm_modulate_quantize_residual, (x, shift, scale, 1e-6, y, gate)),
        (ops.quantize_heads, (torch.randn(2, 4, 5, 16, generator=gen).to(BF16),)),
        (ops.gelu_quantize, (x,)),
        (ops.gelu_quantize, (x, "none")),
        (ops.silu_mul_quantize, halves),
        (ops.rms_norm_scale_quantize, (x, torch.ones(64, dtype=BF16), scale, 1e-5)),
        (ops.rms_norm_scale_quantize, (x, None, scale, 1e-5)),
        (ops.rms_norm_residual_scale_quantize, (x, y, torch.ones(64, dtype=BF16), gate, None, scale, 1e-6, 1e-5)),
        (ops.rms_norm_residual_scale_quantize, (x, y, None, None, torch.ones(64, dtype=BF16), scale, 1e-6, 1e-5)),
        (ops.int8_linear_int8_input, (q, s, layer.weight, layer.weight_scale, layer.bias, BF16, 128)),
    ]


@pytest.mark.parametrize("index", range(11))
def test_op_fakes_match_the_real_ops(index, gen):
    """torch.library.opcheck: schema, fake implementation (shapes, dtypes, strides) vs the real op, AOT dispatch."""
    op, args = _op_samples(gen)[index]
    torch.library.opcheck(op, args)


def test_ops_return_what_the_eager_producers_return(gen):
    x, y = (torch.randn(2, 5, 64, generator=gen).to(BF16) for _ in range(2))
    shift, scale, gate = (0.5 * torch.randn(2, 192, generator=gen)).to(BF16).chunk(3, dim=-1)
    rows, x_new = producers.norm_modulate_quantize(x, shift, scale, 1e-6, y=y, gate=gate)
    q, s, x_op = torch.ops.headroom.norm_modulate_quantize_residual(x, shift, scale, 1e-6, y, gate)
    assert torch.equal(q, rows.q) and torch.equal(s, rows.scale) and torch.equal(x_op, x_new)
    h = F.gelu(x.float(), approximate="tanh").reshape(10, 64)
    q, s = torch.ops.headroom.gelu_quantize(x)
    q_ref, s_ref = quantize_activation(h)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_compiled_block_keeps_producers_on_gpu(gen):
    """On the GPU with the automatic kernel choice (Triton W8A8 from sm80 on, bar Ampere/Ada's _int_mm): inductor,
    fullgraph, producers in the graph; output = the eager producer path up to inductor's own float rounding."""
    block, recorder = _int8_block().cuda(), GraphRecorder()
    x, c = (t.cuda() for t in _block_inputs(gen, tokens=256))
    with torch.no_grad():
        eager = block(x, c)
        assert block.producer_forwards == 1
        torch.compile(block, backend=recorder, fullgraph=True)(x, c)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)(x, c)
    assert PRODUCER_OPS <= set(recorder.graphs[0])
    cos = F.cosine_similarity(compiled.double().flatten(), eager.double().flatten(), dim=0)
    assert float(cos) > 0.9999
