"""The mask-free MoE forward (integrations/hunyuan3/moe.py) against Tencent-style eager routing on the fake, and
the INT8 engine's load (integrations/hunyuan3/int8_engine.py) end to end on the CPU."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from comfyui_headroom.integrations.hunyuan3 import moe as moe_module  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.inputs import LoaderError  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model, save_quantized  # noqa: E402
from comfyui_headroom.integrations.hunyuan3.moe import (  # noqa: E402
    HeadroomMoE,
    StackedExperts,
    moe_engines,
    replace_moe,
    route,
    sort_by_expert,
)
from comfyui_headroom.quant.grouped import GroupedLinear, Int8GroupedLinear  # noqa: E402
from hunyuan3_fake import build_fake_folder  # noqa: E402

CPU_ROAD = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU road; tests/test_hunyuan3_gpu.py covers CUDA")


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory):
    return build_fake_folder(tmp_path_factory.mktemp("hy3moe") / "fake", num_experts=8, moe_topk=3)


@pytest.fixture(scope="module")
def bf16_model(fake_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fake_folder, trust_remote_code=True, dtype=torch.bfloat16)


def _eager_moe(model):
    return model.model.layers[0].mlp


def _tokens(n=97, hidden=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, hidden, generator=g).to(torch.bfloat16)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_routing_matches_the_eager_gate(bf16_model):
    gate = _eager_moe(bf16_model).gate
    x = _tokens()
    combine, dispatch = gate(x)
    weights, experts = route(gate, x.reshape(-1, 128))
    ours = torch.zeros(weights.shape[0], 8).scatter(1, experts, weights)
    torch.testing.assert_close(ours, combine.sum(-1), rtol=0, atol=1e-7)
    assert torch.allclose(weights.sum(1), torch.ones(weights.shape[0]))


def test_sorting_groups_every_pair_under_its_expert():
    experts = torch.tensor([[2, 0], [2, 1], [0, 2], [3, 0]])
    order, token_of_row, offsets = sort_by_expert(experts, num_experts=5)
    assert offsets.tolist() == [0, 3, 4, 7, 8, 8]  # expert 4 receives nothing
    flat = experts.reshape(-1)
    for e in range(5):
        rows = order[offsets[e]:offsets[e + 1]]
        assert (flat[rows] == e).all()
        assert token_of_row[offsets[e]:offsets[e + 1]].tolist() == sorted(token_of_row[offsets[e]:offsets[e + 1]].tolist())
    assert (token_of_row == order // 2).all()


@pytest.mark.parametrize("stack", [None, "bf16", "int8"])
def test_mask_free_moe_matches_tencent_eager(bf16_model, stack):
    model = copy.deepcopy(bf16_model)
    eager = _eager_moe(model)
    x = _tokens()
    if stack == "int8":  # the reference runs the same INT8-rounded expert weights in float
        for expert in eager.experts:
            for proj in (expert.gate_and_up_proj, expert.down_proj):
                q = Int8GroupedLinear.from_linears([proj])
                proj.weight.data = q.expert_weight(0, torch.bfloat16)
    reference = eager(x)
    replaced = replace_moe(model, stack=stack)
    assert set(replaced.values()) == {{None: "per-expert", "bf16": "grouped-bf16", "int8": "headroom-int8"}[stack]}
    ours = _eager_moe(model)
    assert isinstance(ours, HeadroomMoE)
    out = ours(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    if stack is None:
        assert torch.equal(out, reference)  # the same modules on the same rows
    else:  # grouped GEMMs round differently; INT8 adds the activation's quantization
        assert _rel(out, reference) < (0.02 if stack == "int8" else 0.01)


def _peak_cpu_bytes(fn) -> int:
    """Peak bytes held by the tensors ``fn`` allocates (torch's CPU memory profiler, allocations minus frees)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_mask_free_moe_needs_far_less_memory_than_the_dispatch_mask(fake_folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(fake_folder, trust_remote_code=True)
    config.num_experts, config.moe_topk, config.num_hidden_layers = 32, 4, 1
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=torch.bfloat16)
    eager = _eager_moe(model)
    tokens, hidden, width = 2048, config.hidden_size, config.moe_intermediate_size
    x = _tokens(tokens)
    with torch.no_grad():
        eager_peak = _peak_cpu_bytes(lambda: eager(x))
        replace_moe(model, stack="bf16")
        ours_peak = _peak_cpu_bytes(lambda: _eager_moe(model)(x))
    k, experts = config.moe_topk, config.num_experts
    capacity = tokens * k // experts  # at least the mean load of an expert
    assert eager_peak > tokens * experts * capacity * 4  # the float32 combine weights [tokens, experts, capacity]
    # ours: O(tokens x top-k x width) - gathered rows, gate_and_up output, activation, down output, unsorted copy
    bound = tokens * k * (hidden + 2 * width + width + 2 * hidden) * 2 + tokens * hidden * 8
    assert ours_peak < bound, (ours_peak, bound)
    assert ours_peak * 15 < eager_peak, (ours_peak, eager_peak)  # ~21x here (CPU, 2048 tokens, 32 experts)


def test_chunked_tokens_give_the_same_output(bf16_model, monkeypatch):
    model = copy.deepcopy(bf16_model)
    replace_moe(model, stack="bf16")
    moe = _eager_moe(model)
    x = _tokens(61)
    whole = moe(x)
    monkeypatch.setenv("HEADROOM_MOE_CHUNK_PAIRS", "12")  # 4 tokens per chunk at top-3
    torch.testing.assert_close(moe(x), whole, rtol=0, atol=0)
    for bad in ("lots", "0", "-3"):
        monkeypatch.setenv("HEADROOM_MOE_CHUNK_PAIRS", bad)
        with pytest.raises(ValueError, match="HEADROOM_MOE_CHUNK_PAIRS"):
            moe(x)


def test_names_stay_and_the_status_counts_engines(bf16_model):
    model = copy.deepcopy(bf16_model)
    replace_moe(model, stack=None)
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in bf16_model.named_parameters()}  # per-expert: the checkpoint's names
    assert moe_engines(model) == {"per-expert": 2}
    stacked = copy.deepcopy(bf16_model)
    replace_moe(stacked, stack="int8")
    assert "model.layers.1.mlp.experts.gate_and_up_proj.weight" in dict(stacked.named_buffers())
    assert "model.layers.1.mlp.gate.wg.weight" in dict(stacked.named_parameters())
    assert moe_engines(stacked) == {"headroom-int8": 2}
    assert stacked.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32  # the router stays float32


def test_unsupported_routing_keeps_tencents_forward(bf16_model, caplog):
    model = copy.deepcopy(bf16_model)
    model.model.layers[0].mlp.gate.drop_tokens = True
    done = replace_moe(model, stack="bf16")
    assert list(done) == ["model.layers.1.mlp"]
    assert moe_engines(model) == {"grouped-bf16": 1, "tencent": 1}
    assert "moe_drop_tokens" in caplog.text


def test_stacking_refuses_experts_of_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        GroupedLinear.from_linears([nn.Linear(4, 8, bias=False), nn.Linear(4, 6, bias=False)])
    with pytest.raises(ValueError, match="bias"):
        Int8GroupedLinear.from_linears([nn.Linear(4, 8)])


def test_a_stacked_int8_expert_holds_its_row_wise_quantization():
    torch.manual_seed(0)
    linears = [nn.Linear(64, 32, bias=False) for _ in range(3)]
    stack = Int8GroupedLinear.from_linears(linears)
    assert stack.weight.dtype == torch.int8 and stack.weight_scale.shape == (3, 32)
    for e, linear in enumerate(linears):
        assert _rel(stack.expert_weight(e), linear.weight) < 0.01
    moved = stack.to(torch.bfloat16)  # dtype casts leave the INT8 weight and its float32 scale alone
    assert moved.weight.dtype == torch.int8 and moved.weight_scale.dtype == torch.float32


# ------------------------------------------------------------------------------------ the INT8 engine's load


@CPU_ROAD
def test_int8_engine_loads_quantized_and_close_to_bf16(fake_folder):
    bf16 = load_hf_model(fake_folder, "bf16", trust_remote_code=True)
    int8 = load_hf_model(fake_folder, "int8", trust_remote_code=True)
    assert int8.engine == "headroom-int8" and bf16.engine == "bf16"
    assert int8.moe == {"headroom-int8": 2} and bf16.moe == {"grouped-bf16": 2}
    layer = int8.model.model.layers[0]
    assert isinstance(layer.mlp.experts, StackedExperts) and layer.mlp.experts.int8
    assert type(layer.self_attn.qkv_proj).__name__ == "Int8Linear"  # attention INT8 on our engine
    assert layer.mlp.gate.wg.weight.dtype == torch.float32  # the router float, as the skip list says
    assert "headroom-int8" in int8.summary() and "MoE layers: 2 headroom-int8" in int8.summary()
    assert not int8.dtype_report.leaks
    x = _tokens(50)
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(bf16.model.model(x).float().flatten(),
                                              int8.model.model(x).float().flatten(), dim=0)
    assert cos > 0.999
    a = np.asarray(bf16.model.generate_image("a red fox", seed=1)).astype(float)
    b = np.asarray(int8.model.generate_image("a red fox", seed=1)).astype(float)
    assert a.shape == b.shape and 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-9)) > 30
    with pytest.raises(LoaderError, match="headroom convert"):
        save_quantized(int8, fake_folder.parent / "nope")


@CPU_ROAD
def test_int8_engine_reads_a_headroom_convert_folder_without_quantizing_again(tmp_path):
    from comfyui_headroom.quant.convert import convert_folder

    # wide enough that the converter quantizes the experts (it keeps layers under 1024 features float)
    src = build_fake_folder(tmp_path / "wide", hidden_size=1024, moe_intermediate_size=1024, num_experts=2,
                            moe_topk=1, num_hidden_layers=1, vit_aligner={"input_dim": 64, "n_embed": 1024})
    out = tmp_path / "converted"
    convert_folder(src, out, progress=False)
    assert (out / "modeling_hunyuan3_fake.py").exists() and (out / "generation_config.json").exists()
    direct = load_hf_model(src, "int8", trust_remote_code=True)
    converted = load_hf_model(out, "int8", trust_remote_code=True, int8_engine="bitsandbytes")  # the folder decides
    assert converted.engine == "headroom-int8"
    assert converted.telemetry["read_as_int8"] >= 2 and direct.telemetry["read_as_int8"] == 0
    stack = converted.model.model.layers[0].mlp.experts.gate_and_up_proj
    assert torch.equal(stack.weight, direct.model.model.layers[0].mlp.experts.gate_and_up_proj.weight)
    for mode in ("bf16", "nf4"):  # they would read the int8 values as numbers
        with pytest.raises(LoaderError, match="holds headroom INT8 weights"):
            load_hf_model(out, mode, trust_remote_code=True)


@CPU_ROAD
def test_int8_engine_names_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = build_fake_folder(tmp_path / "fake", num_experts=4, moe_topk=2)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(LoaderError, match="experts.down_proj"):
        load_hf_model(folder, "int8", trust_remote_code=True)
    tensors["model.layers.1.mlp.experts.3.down_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(LoaderError, match=r"experts.3.down_proj.weight has shape \[3, 3\]"):
        load_hf_model(folder, "int8", trust_remote_code=True)


def test_the_moe_module_has_no_device_calls():
    """Tencent's MoE calls torch.cuda.set_device on every forward; ours must run anywhere."""
    import inspect

    assert "set_device" not in inspect.getsource(moe_module)
