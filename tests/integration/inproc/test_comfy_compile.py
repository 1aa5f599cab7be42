"""torch.compile on a MODEL from our INT8 loader, inside a real ComfyUI (in process, CPU).

ComfyUI's own Flux already breaks the graph on the CPU (its sub-quadratic attention asks psutil for free
memory, which dynamo cannot trace), so the claim checked here is relative: our INT8 layers add no graph
break to what ComfyUI's stock model has, and they are traced as our custom op rather than run eagerly.
Then ComfyUI's "TorchCompileModel" node (inductor) samples with our model and matches the eager result.
"""

import comfy.model_management as mm
import comfy.sample
import comfy.sd
import pytest
import torch
from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig
from comfyui_headroom.quant.linear import int8_layers
from comfyui_models import flux_state_dict
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def flux_path(workdir):
    path = workdir / "flux_compile.safetensors"
    save_file(flux_state_dict(), str(path))
    return str(path)


def _inputs():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.7]))  # x, timestep
    return args, dict(context=torch.randn(1, 12, 768, generator=g), y=torch.randn(1, 768, generator=g))


def _explain(patcher):
    mm.load_models_gpu([patcher])
    torch._dynamo.reset()
    with torch.no_grad():
        args, kwargs = _inputs()
        return torch._dynamo.explain(patcher.model.diffusion_model)(*args, **kwargs)


def _called(explained) -> set[str]:
    return {str(node.target) for gm in explained.graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("rotation_group", [0, 128])
def test_int8_layers_add_no_graph_break(flux_path, rotation_group):
    stock = _explain(comfy.sd.load_diffusion_model(flux_path))
    patcher, record = load_int8_diffusion_model(flux_path, Int8LoadConfig(rotation_group=rotation_group))
    assert record.int8_layers == 10 and len(record.rotated_on_load) == (10 if rotation_group else 0)
    ours = _explain(patcher)
    assert ours.graph_break_count == stock.graph_break_count, [b.reason for b in ours.break_reasons]
    for brk in ours.break_reasons:
        frames = [frame.filename for frame in brk.user_stack]
        assert not any("comfyui_headroom" in f for f in frames), (brk.reason, frames)
    op = "headroom.rotated_int8_linear" if rotation_group else "headroom.int8_linear"
    assert op in _called(ours)  # traced as our op (the fused kernels stay usable), not run outside the graph
    assert not any("headroom" in target for target in _called(stock))


def _sample(model, steps=2):
    g = torch.Generator().manual_seed(1)
    context, pooled = torch.randn(1, 12, 768, generator=g), torch.randn(1, 768, generator=g)
    positive = [[context, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent, seed=0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_compile_model_node_samples_our_int8_model(flux_path):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    patcher, _ = load_int8_diffusion_model(flux_path, Int8LoadConfig())
    eager = _sample(patcher)
    torch._dynamo.reset()
    compiled_model = TorchCompileModel.execute(patcher, "inductor").result[0]
    assert type(compiled_model).__name__ == "Int8ModelPatcher"  # the node's clone keeps our patcher
    compiled = _sample(compiled_model)
    assert any(layer.weight.dtype == torch.int8 for _, layer in int8_layers(compiled_model.model))
    err = float((compiled - eager).norm() / eager.norm())
    assert err < 1e-3, err


@pytest.mark.parametrize("fuse_blocks", ["on", "auto"])
def test_fused_blocks_trace_with_their_producers(flux_path, fuse_blocks):
    """Fused blocks under dynamo: no graph break of ours (a fallback - ``auto`` on a CPU has no W8A8 kernel - is
    traced too), and with ``on`` the graph holds the producers and the GEMM on INT8 rows as custom ops."""
    stock = _explain(comfy.sd.load_diffusion_model(flux_path))
    patcher, _ = load_int8_diffusion_model(flux_path, Int8LoadConfig(fuse_blocks=fuse_blocks))
    ours = _explain(patcher)
    assert ours.graph_break_count <= stock.graph_break_count, [b.reason for b in ours.break_reasons]
    for brk in ours.break_reasons:
        assert not any("comfyui_headroom" in frame.filename for frame in brk.user_stack), brk.reason
    called = _called(ours)
    producers = {"headroom.norm_modulate_quantize", "headroom.norm_modulate_quantize_residual",
                 "headroom.quantize_heads", "headroom.gelu_quantize", "headroom.int8_linear_int8_input"}
    if fuse_blocks == "on":
        assert producers <= called, called
    else:
        assert "headroom.int8_linear" in called and not producers & called, called
