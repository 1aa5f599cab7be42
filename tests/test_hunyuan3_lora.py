"""LoRA on HunyuanImage-3 (integrations/hunyuan3/lora.py, nodes/hunyuan3_lora_node.py) on the CPU, with the tiny
fake model (tests/fixtures/hunyuan3_fake): side branches on Int8Linear, on stacked experts (Int8GroupedLinear /
GroupedLinear), forward hooks on every other Linear (nn.Linear, bitsandbytes); the node's stack from the graph.

The LoRA factors are drawn in float32 and rounded to bf16 (the branches' storage dtype), so the float model's
output with a LoRA equals the merged-weight model's up to float32 summation order.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from comfyui_headroom.integrations.hunyuan3 import lora as hl
from comfyui_headroom.integrations.hunyuan3.lora import (
    LoraEntry,
    LoraFormatError,
    LoraKeyError,
    LoraShapeError,
    applied_stack,
    apply_hunyuan3_loras,
    apply_stack,
    clear_hunyuan3_loras,
    reapply_after_reload,
    stack_for_consumer,
)
from comfyui_headroom.quant.grouped import GroupedLinear, Int8GroupedLinear
from comfyui_headroom.quant.linear import Int8Linear
from hunyuan3_fake import FIXTURE, build_fake_folder
from safetensors.torch import save_file
from torch import nn

ATTN = "model.layers.0.self_attn.qkv_proj"
O_PROJ = "model.layers.1.self_attn.o_proj"
SHARED = "model.layers.0.mlp.shared_mlp.gate_and_up_proj"
SHARED_DOWN = "model.layers.1.mlp.shared_mlp.down_proj"
EXPERT = "model.layers.1.mlp.experts.2.gate_and_up_proj"
EXPERT_DOWN = "model.layers.0.mlp.experts.3.down_proj"
TARGETS = (ATTN, O_PROJ, SHARED, SHARED_DOWN, EXPERT, EXPERT_DOWN)


# ------------------------------------------------------------------------------ the model and LoRA files


def _fake_module():
    spec = importlib.util.spec_from_file_location("hunyuan3_fake_modeling_lora", FIXTURE / "modeling_hunyuan3_fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKE = _fake_module()


def fake_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = FAKE.HunyuanImage3ForCausalMM(FAKE.HunyuanImage3Config()).to(dtype).eval()
    with torch.no_grad():  # the router: float32 as in the real model
        for layer in model.model.layers:
            layer.mlp.gate.wg.float()
    return model


def tokens(seed=1, n=6, dtype=torch.float32):
    return torch.randn(1, n, 128, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(model, x):
    with torch.no_grad():
        return model.model(x)


def bf16r(t):
    return t.to(torch.bfloat16).float()


def lora_factors(model, names, rank=4, seed=0, alpha=None, std=0.05):
    """{name: (down [r, in], up [out, r], alpha)} for modules of ``model`` (a per-expert name on a stacked model
    takes the stack's sizes)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        out_f, in_f = _sizes(model, name)
        out[name] = (bf16r(torch.randn(rank, in_f, generator=g) * std), bf16r(torch.randn(out_f, rank, generator=g) * std),
                     alpha)
    return out


def _sizes(model, name):
    try:
        m = model.get_submodule(name)
    except AttributeError:
        parent, _, leaf = name.rsplit(".", 2)
        m = model.get_submodule(f"{parent}.{leaf}")
    return m.out_features, m.in_features


def write_lora(path, factors, style="peft", prefix="base_model.model."):
    tensors = {}
    for name, (down, up, alpha) in factors.items():
        if style == "peft":
            key = prefix + name
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        elif style == "kohya":
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        else:
            raise ValueError(style)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def delta(factors, name, strength=1.0):
    down, up, alpha = factors[name]
    rank = down.shape[0]
    return strength * (alpha if alpha is not None else rank) / rank * up @ down


def merged(model, stack):
    """A copy of ``model`` with every (factors, strength) of ``stack`` merged into the float weights."""
    twin = copy.deepcopy(model)
    for m in twin.modules():  # the copy carries no LoRA of ours: no hooks, no branches, no record
        m._forward_hooks.clear()
        if isinstance(getattr(m, "lora", None), (list, dict)):
            m.lora = type(m.lora)()
    twin.__dict__.pop(hl.RECORD_ATTR, None)
    with torch.no_grad():
        for factors, strength in stack:
            for name in factors:
                try:
                    twin.get_submodule(name).weight += delta(factors, name, strength).to(torch.float32)
                except AttributeError:  # experts stacked: name = ...experts.E.proj
                    parent, expert, leaf = name.rsplit(".", 2)
                    twin.get_submodule(f"{parent}.{leaf}").weight[int(expert)] += delta(factors, name, strength)
    return twin


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def model():
    return fake_model()


@pytest.fixture
def fresh(model):
    clear_hunyuan3_loras(model)
    yield model
    clear_hunyuan3_loras(model)


# ------------------------------------------------------------------------------ 1. equals the merged weight


@pytest.mark.parametrize("style,prefix", [("peft", "base_model.model."), ("peft", ""), ("peft", "diffusion_model."),
                                          ("kohya", "lora_unet_"), ("kohya", "lora_transformer_")])
def test_float_model_with_a_lora_equals_the_merged_weights(fresh, tmp_path, style, prefix):
    factors = lora_factors(fresh, TARGETS, alpha=2.0)
    path = write_lora(tmp_path / "a.safetensors", factors, style, prefix)
    x = tokens()
    base = run(fresh, x)
    report = apply_hunyuan3_loras(fresh, [(path, 0.8)])
    want = run(merged(fresh, [(factors, 0.8)]), x)
    got = run(fresh, x)
    assert not torch.allclose(want, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert report.layers == {"attention": 2, "shared": 2, "experts": 2, "other": 0}
    # a float Linear's branches take its own dtype (here float32: 4 bytes); Int8Linear / bnb / grouped: bf16
    assert report.hooks == 6 and report.branch_bytes == sum((d.numel() + u.numel()) * 4 for d, u, _ in factors.values())
    assert fresh.get_submodule(ATTN).weight.dtype == torch.float32  # never merged: the weight is untouched


def test_transformer_prefix_without_model_and_the_router_take_a_hook(fresh, tmp_path):
    # diffusers-style: "transformer.layers.0..." -> "model.layers.0..."; the float32 router is a Linear: allowed
    factors = lora_factors(fresh, [ATTN, "model.layers.1.mlp.gate.wg"])
    tensors = {}
    for name, (down, up, _) in factors.items():
        key = "transformer." + name.removeprefix("model.")
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    save_file(tensors, str(tmp_path / "t.safetensors"))
    x = tokens()
    report = apply_hunyuan3_loras(fresh, [(tmp_path / "t.safetensors", 1.0)])
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(factors, 1.0)]), x), atol=2e-5, rtol=1e-5)
    assert report.layers["other"] == 1


def test_int8_layers_carry_the_branches_in_their_lora_list(tmp_path):
    model = fake_model()
    for name in TARGETS:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                Int8Linear.from_linear(model.get_submodule(name), compute_dtype=torch.float32))
    factors = lora_factors(model, TARGETS, alpha=8.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    xs = {n: x if model.get_submodule(n).in_features == 128 else torch.randn(5, model.get_submodule(n).in_features)
          for n in TARGETS}
    with torch.no_grad():
        before = {n: model.get_submodule(n)(xs[n]) for n in TARGETS}
    apply_hunyuan3_loras(model, [(path, -1.5)])
    assert hook_count(model) == 0
    for name in TARGETS:
        layer = model.get_submodule(name)
        assert len(layer.lora) == 1 and layer.lora[0][0].dtype == torch.bfloat16
        with torch.no_grad():
            added = layer(xs[name]) - before[name]
        torch.testing.assert_close(added, F.linear(xs[name], delta(factors, name, -1.5)), atol=1e-5, rtol=1e-4)
    clear_hunyuan3_loras(model)
    assert all(model.get_submodule(n).lora == [] for n in TARGETS)


# ------------------------------------------------------------------------------ 2. stacked experts


def _stand_in_grouped_kernels():
    """What kernels/grouped.py computes, as loops (only when that module is not in this branch yet)."""
    module = types.ModuleType("comfyui_headroom.kernels.grouped")

    def bounds(offsets):
        o = offsets.tolist()
        return [(e, o[e], o[e + 1]) for e in range(len(o) - 1)]

    def grouped_float_linear(rows, weight, group_offsets):
        y = rows.new_zeros(rows.shape[0], weight.shape[1])
        for e, s, t in bounds(group_offsets):
            y[s:t] = rows[s:t] @ weight[e].T
        return y

    def grouped_int8_linear(q, scale, weight, weight_scale, group_offsets, row_index=None, out_dtype=torch.bfloat16):
        rows = q.float() * scale.reshape(-1, 1)
        rows = rows[row_index] if row_index is not None else rows
        y = torch.zeros(rows.shape[0], weight.shape[1])
        for e, s, t in bounds(group_offsets):
            y[s:t] = rows[s:t] @ (weight[e].float() * weight_scale[e][:, None]).T
        return y.to(out_dtype)

    module.grouped_float_linear, module.grouped_int8_linear = grouped_float_linear, grouped_int8_linear
    return module


@pytest.fixture
def grouped_kernels(monkeypatch):
    try:
        importlib.import_module("comfyui_headroom.kernels.grouped")
    except ImportError:
        monkeypatch.setitem(sys.modules, "comfyui_headroom.kernels.grouped", _stand_in_grouped_kernels())


class StackedExperts(nn.Module):
    """``mlp.experts`` after stacking: children ``gate_and_up_proj`` / ``down_proj`` are grouped layers; iterating
    gives per-expert callables, so the fake's MoE forward runs unchanged (each expert on all rows)."""

    def __init__(self, experts, cls):
        super().__init__()
        self.num_experts = len(experts)
        self.gate_and_up_proj = cls.from_linears([m.gate_and_up_proj for m in experts])
        self.down_proj = cls.from_linears([m.down_proj for m in experts])

    def __len__(self):
        return self.num_experts

    def __iter__(self):
        return iter([lambda x, e=e: self.run_expert(e, x) for e in range(self.num_experts)])

    def run_expert(self, e, x):
        flat = x.reshape(-1, x.shape[-1])
        offsets = torch.tensor([0] * (e + 1) + [flat.shape[0]] * (self.num_experts - e))
        gate, up = self.gate_and_up_proj.forward_sorted(flat, offsets).chunk(2, dim=-1)
        return self.down_proj.forward_sorted(up * F.silu(gate), offsets).reshape(*x.shape[:-1], -1)


def stacked_model(cls):
    model = fake_model()
    for layer in model.model.layers:
        layer.mlp.experts = StackedExperts(list(layer.mlp.experts), cls)
    return model


def test_stacked_float_experts_with_a_lora_equal_the_merged_stack(grouped_kernels, tmp_path):
    model = stacked_model(GroupedLinear)
    factors = lora_factors(model, TARGETS, alpha=3.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    x = tokens()
    base = run(model, x)
    report = apply_hunyuan3_loras(model, [(path, 1.25)])
    layer = model.get_submodule("model.layers.1.mlp.experts.gate_and_up_proj")
    assert set(layer.lora) == {2} and len(layer.lora[2]) == 1
    assert set(model.get_submodule("model.layers.0.mlp.experts.down_proj").lora) == {3}
    assert report.layers["experts"] == 2 and report.hooks == 4  # attention + shared stay nn.Linear: hooks
    want = run(merged(model, [(factors, 1.25)]), x)
    assert not torch.allclose(want, base, atol=1e-3)
    torch.testing.assert_close(run(model, x), want, atol=2e-5, rtol=1e-5)
    clear_hunyuan3_loras(model)
    assert layer.lora == {} and hook_count(model) == 0
    assert torch.equal(run(model, x), base)


def test_stacked_int8_experts_add_each_experts_branch_on_its_rows_only(grouped_kernels, tmp_path):
    model = stacked_model(Int8GroupedLinear)
    name = "model.layers.1.mlp.experts.gate_and_up_proj"
    layer = model.get_submodule(name)
    factors = lora_factors(model, ["model.layers.1.mlp.experts.1.gate_and_up_proj",
                                   "model.layers.1.mlp.experts.3.gate_and_up_proj"], seed=5)
    path = write_lora(tmp_path / "e.safetensors", factors, "kohya", "lora_unet_")
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(7))
    offsets = torch.tensor([0, 2, 5, 7, 10])  # rows of experts 0..3
    row_index = torch.randperm(10, generator=torch.Generator().manual_seed(8))
    before = layer.forward_sorted(x, offsets, row_index)
    apply_hunyuan3_loras(model, [(path, 0.5)])
    added = layer.forward_sorted(x, offsets, row_index) - before
    rows = x[row_index]
    assert torch.count_nonzero(added[:2]) == 0 and torch.count_nonzero(added[5:7]) == 0
    for e, (s, t) in ((1, (2, 5)), (3, (7, 10))):
        want = F.linear(rows[s:t], delta(factors, f"model.layers.1.mlp.experts.{e}.gate_and_up_proj", 0.5))
        torch.testing.assert_close(added[s:t], want, atol=1e-5, rtol=1e-4)


def test_fused_expert_keys_with_stacked_factors_go_to_each_expert(grouped_kernels, tmp_path):
    for form in ("stacked", "modulelist"):
        model = stacked_model(GroupedLinear) if form == "stacked" else fake_model()
        per_expert = lora_factors(model, [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(4)], seed=9)
        downs = torch.stack([per_expert[f"model.layers.0.mlp.experts.{e}.down_proj"][0] for e in range(4)])
        ups = torch.stack([per_expert[f"model.layers.0.mlp.experts.{e}.down_proj"][1] for e in range(4)])
        save_file({"base_model.model.model.layers.0.mlp.experts.down_proj.lora_A.weight": downs,
                   "base_model.model.model.layers.0.mlp.experts.down_proj.lora_B.weight": ups},
                  str(tmp_path / f"fused_{form}.safetensors"))
        x = tokens()
        report = apply_hunyuan3_loras(model, [(tmp_path / f"fused_{form}.safetensors", 1.0)])
        assert report.layers["experts"] == 4
        torch.testing.assert_close(run(model, x), run(merged(model, [(per_expert, 1.0)]), x), atol=2e-5, rtol=1e-5)
        # one 2-D pair for all experts of the fused name: refused, saying so
        save_file({"model.layers.0.mlp.experts.down_proj.lora_A.weight": downs[0].contiguous(),
                   "model.layers.0.mlp.experts.down_proj.lora_B.weight": ups[0].contiguous()},
                  str(tmp_path / "shared.safetensors"))
        with pytest.raises(LoraShapeError, match="one 2-D LoRA pair for all 4 experts"):
            apply_hunyuan3_loras(model, [(tmp_path / "shared.safetensors", 1.0)])


def test_grouped_add_lora_directly_with_a_known_output():
    # the grouped layers' LoRA path without any kernel: _add_lora on a known y
    linears = [nn.Linear(16, 8, bias=False) for _ in range(3)]
    layer = GroupedLinear.from_linears(linears)
    model = nn.Module()
    model.model = nn.Module()
    model.model.experts = nn.Module()
    model.model.experts.proj = layer
    g = torch.Generator().manual_seed(2)
    down, up = bf16r(torch.randn(2, 16, generator=g)), bf16r(torch.randn(8, 2, generator=g))
    tmp = {"model.experts.1.proj.lora_down.weight": down, "model.experts.1.proj.lora_up.weight": up,
           "model.experts.1.proj.alpha": torch.tensor(1.0)}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_file(tmp, f"{d}/x.safetensors")
        apply_hunyuan3_loras(model, [(f"{d}/x.safetensors", 2.0)])
    x = torch.randn(6, 16, generator=g)
    y = torch.zeros(6, 8)
    out = layer._add_lora(x, y.clone(), torch.tensor([0, 1, 4, 6]), None)
    torch.testing.assert_close(out[1:4], 2.0 * 0.5 * x[1:4] @ (up @ down).T)
    assert torch.count_nonzero(out[:1]) == 0 and torch.count_nonzero(out[4:]) == 0


# ------------------------------------------------------------------------------ 3. strength, stacks, clearing


def test_strength_changes_without_reading_or_preparing_again_and_moves_the_output_linearly(fresh, tmp_path,
                                                                                          monkeypatch):
    factors = lora_factors(fresh, TARGETS)
    path = write_lora(tmp_path / "a.safetensors", factors)
    x = tokens()
    layer = fresh.get_submodule(SHARED)
    base = layer(x)
    apply_hunyuan3_loras(fresh, [(path, 1.0)])
    one = layer(x) - base
    tensors = getattr(fresh, hl.RECORD_ATTR).prepared
    first = [(b.down, b.up) for f in tensors.values() for b in f.branches]

    def no_read(path):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(hl, "read_lora", no_read)
    for s in (2.0, -0.5, 3.75):
        apply_hunyuan3_loras(fresh, [(path, s)])
        torch.testing.assert_close(layer(x) - base, s * one, atol=1e-5, rtol=1e-4)
    again = [(b.down, b.up) for f in getattr(fresh, hl.RECORD_ATTR).prepared.values() for b in f.branches]
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, again))
    assert len(layer._forward_hooks) == 1


def test_two_loras_add_up_on_shared_layers(fresh, tmp_path):
    a = lora_factors(fresh, TARGETS, seed=1, alpha=2.0)
    b = lora_factors(fresh, [ATTN, EXPERT, "model.layers.1.self_attn.qkv_proj"], seed=2, rank=8)
    pa = write_lora(tmp_path / "a.safetensors", a)
    pb = write_lora(tmp_path / "b.safetensors", b, "kohya", "lora_unet_")
    x = tokens()
    report = apply_hunyuan3_loras(fresh, [(pa, 0.7), (pb, -1.2)])
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 0.7), (b, -1.2)]), x), atol=2e-5, rtol=1e-5)
    assert report.layers["attention"] == 3 and [n for _, _, n in report.files] == [6, 3]
    assert len(fresh.get_submodule(ATTN)._forward_hooks) == 1  # one hook per layer, two branches in it
    # the same file twice (two nodes) counts twice
    apply_hunyuan3_loras(fresh, [(pa, 0.5), (pa, 0.25)])
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 0.75)]), x), atol=2e-5, rtol=1e-5)


def test_strength_zero_attaches_nothing(fresh, tmp_path):
    a = lora_factors(fresh, TARGETS)
    pa = write_lora(tmp_path / "a.safetensors", a)
    x = tokens()
    base = run(fresh, x)
    report = apply_hunyuan3_loras(fresh, [(pa, 0.0)])
    assert hook_count(fresh) == 0 and report.branch_bytes == 0 and report.files == [(pa, 0.0, 0)]
    assert torch.equal(run(fresh, x), base)
    pb = write_lora(tmp_path / "b.safetensors", lora_factors(fresh, [ATTN], seed=3))
    apply_hunyuan3_loras(fresh, [(pa, 0.0), (pb, 1.0)])
    assert hook_count(fresh) == 1


def test_reapplying_is_idempotent_and_clear_restores_the_exact_output(fresh, tmp_path):
    a = lora_factors(fresh, TARGETS)
    pa = write_lora(tmp_path / "a.safetensors", a)
    x = tokens()
    base = run(fresh, x)
    apply_hunyuan3_loras(fresh, [(pa, 1.0)])
    once = run(fresh, x)
    for _ in range(3):
        apply_hunyuan3_loras(fresh, [(pa, 1.0)])
    assert hook_count(fresh) == 6
    assert torch.equal(run(fresh, x), once)
    assert applied_stack(fresh) == [(pa, 1.0)]
    assert clear_hunyuan3_loras(fresh) and not clear_hunyuan3_loras(fresh)
    assert hook_count(fresh) == 0 and applied_stack(fresh) is None
    assert torch.equal(run(fresh, x), base)
    apply_hunyuan3_loras(fresh, [(pa, 1.0)])
    apply_hunyuan3_loras(fresh, [])  # an empty stack clears too
    assert hook_count(fresh) == 0 and torch.equal(run(fresh, x), base)


def test_a_rewritten_file_is_read_again(fresh, tmp_path):
    path = tmp_path / "a.safetensors"
    a = lora_factors(fresh, [ATTN], seed=1)
    write_lora(path, a)
    x = tokens()
    apply_hunyuan3_loras(fresh, [(path, 1.0)])
    b = lora_factors(fresh, [ATTN], seed=2, rank=6)
    write_lora(path, b)
    import os

    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    apply_hunyuan3_loras(fresh, [(path, 1.0)])
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(b, 1.0)]), x), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ 4. what is refused


def test_unmatched_keys_are_named_with_what_the_models_names_look_like(fresh, tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128, generator=g),
               "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4, generator=g),
               f"{ATTN}.lora_A.weight": torch.randn(4, 128, generator=g),
               f"{ATTN}.lora_B.weight": torch.randn(384, 4, generator=g)}, str(tmp_path / "sdxl.safetensors"))
    apply_hunyuan3_loras(fresh, [(write_lora(tmp_path / "ok.safetensors", lora_factors(fresh, [O_PROJ])), 1.0)])
    with pytest.raises(LoraKeyError) as err:
        apply_hunyuan3_loras(fresh, [(tmp_path / "sdxl.safetensors", 1.0)])
    text = str(err.value)
    assert "unet.down_blocks.0.attn.to_q" in text and "1 of 2" in text
    assert "model.layers.0.self_attn.qkv_proj" in text and "base_model.model." in text and "transformer." in text
    assert applied_stack(fresh) == [(str(tmp_path / "ok.safetensors"), 1.0)]  # the previous stack stays
    assert hook_count(fresh) == 1


def test_wrong_shapes_name_the_layer(fresh, tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({f"{SHARED}.lora_down.weight": torch.randn(4, 100, generator=g),
               f"{SHARED}.lora_up.weight": torch.randn(256, 4, generator=g)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraShapeError, match=r"model\.layers\.0\.mlp\.shared_mlp\.gate_and_up_proj.*256x100.*256x128"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "bad.safetensors", 1.0)])
    save_file({f"{SHARED}.lora_down.weight": torch.randn(4, 128, generator=g),
               f"{SHARED}.lora_up.weight": torch.randn(256, 4, generator=g),
               f"{SHARED}.alpha": torch.tensor(float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoraShapeError, match="alpha is nan"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "nan.safetensors", 1.0)])
    assert hook_count(fresh) == 0


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_only_safetensors_files_are_read(fresh, tmp_path, monkeypatch, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(LoraFormatError, match="only .safetensors"):
        apply_hunyuan3_loras(fresh, [(path, 1.0)])


def test_other_adapter_types_convs_and_broken_files_are_refused(fresh, tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({f"{ATTN}.hada_w1_a": torch.randn(4, 4, generator=g)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraFormatError, match="LoHa"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "loha.safetensors", 1.0)])
    save_file({f"{ATTN}.lora_A.weight": torch.randn(4, 128, generator=g)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraFormatError, match="only one LoRA factor"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "half.safetensors", 1.0)])
    save_file({"vae.decoder.0.lora_A.weight": torch.randn(4, 36, generator=g),
               "vae.decoder.0.lora_B.weight": torch.randn(16, 4, generator=g)}, str(tmp_path / "conv.safetensors"))
    with pytest.raises(LoraFormatError, match=r"vae\.decoder\.0 \(Conv2d\)"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "conv.safetensors", 1.0)])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraFormatError, match="not a readable safetensors"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "junk.safetensors", 1.0)])
    with pytest.raises(FileNotFoundError):
        apply_hunyuan3_loras(fresh, [(tmp_path / "missing.safetensors", 1.0)])
    with pytest.raises(ValueError, match="finite"):
        apply_hunyuan3_loras(fresh, [(tmp_path / "half.safetensors", float("nan"))])
    assert hook_count(fresh) == 0


def test_a_peft_folder_takes_alpha_from_its_adapter_config(fresh, tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    factors = lora_factors(fresh, [ATTN, SHARED], rank=4)
    write_lora(folder / "adapter_model.safetensors", factors)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16,
                                                            "alpha_pattern": {"shared_mlp.gate_and_up_proj": 2}}))
    x = tokens()
    apply_hunyuan3_loras(fresh, [(folder, 1.0)])
    want = {ATTN: (*factors[ATTN][:2], 16.0), SHARED: (*factors[SHARED][:2], 2.0)}
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(want, 1.0)]), x), atol=2e-5, rtol=1e-5)
    # the same file given directly: the config next to adapter_model.safetensors counts too
    apply_hunyuan3_loras(fresh, [(folder / "adapter_model.safetensors", 1.0)])
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(want, 1.0)]), x), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ 5. the real loader's models


# The loader takes the CUDA road on a GPU machine (layers on the GPU); these tests feed CPU inputs.
CPU_ROAD = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU road; tests/test_hunyuan3_gpu.py covers CUDA")


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory):
    return build_fake_folder(tmp_path_factory.mktemp("hy3lora") / "HunyuanImage-3-fake")


@CPU_ROAD
def test_bitsandbytes_int8_layers_take_a_hook(fake_folder, tmp_path):
    from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model
    from comfyui_headroom.quant.bnb_layers import is_bnb_quantized

    loaded = load_hf_model(fake_folder, "int8", trust_remote_code=True, int8_engine="bitsandbytes")
    layer = loaded.model.get_submodule(EXPERT)
    assert is_bnb_quantized(layer)
    factors = lora_factors(loaded.model, [EXPERT, ATTN], alpha=4.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x).float()
        apply_stack(loaded, [LoraEntry(path, 2.0)])
        added = layer(x).float() - before
    assert loaded.loras == [LoraEntry(path, 2.0)]
    want = F.linear(x.float(), delta(factors, EXPERT, 2.0))
    assert (added - want).abs().max() < 0.02 * want.abs().max()


@CPU_ROAD
def test_reapply_after_reload_attaches_the_loaded_models_stack(fake_folder, tmp_path):
    from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model

    loaded = load_hf_model(fake_folder, "bf16", trust_remote_code=True)
    assert loaded.loras == []
    assert reapply_after_reload(loaded) is None
    factors = lora_factors(loaded.model, TARGETS)
    path = write_lora(tmp_path / "a.safetensors", factors)
    x = tokens(dtype=torch.bfloat16)
    base = run(loaded.model, x)
    apply_stack(loaded, [LoraEntry(path, 1.0, "7", "a.safetensors")])
    with_lora = run(loaded.model, x)
    assert not torch.equal(with_lora, base)
    assert reapply_after_reload(loaded) is None  # already attached: nothing to do
    loaded.release()  # post_action "unload"
    assert apply_stack(loaded, loaded.loras) is None  # no weights: recorded only
    loaded.model = load_hf_model(fake_folder, "bf16", trust_remote_code=True).model  # what ensure_loaded does
    assert torch.equal(run(loaded.model, x), base)
    report = reapply_after_reload(loaded)
    assert report is not None and report.layers["experts"] == 2
    assert report.branch_bytes == sum((d.numel() + u.numel()) * 2 for d, u, _ in factors.values())  # bf16
    assert torch.equal(run(loaded.model, x), with_lora)
    loaded.loras = []
    reapply_after_reload(loaded)  # the stack was emptied: the branches go
    assert torch.equal(run(loaded.model, x), base)


# ------------------------------------------------------------------------------ 6. the node


def _prompt(chain, generator=True):
    """ComfyUI API prompt: loader "1" -> LoRA nodes (id, path, strength) in order -> generator "9"."""
    prompt = {"1": {"class_type": "Hunyuan3LoaderBF16Budget", "inputs": {"model_folder": "x"}}}
    upstream = "1"
    for node_id, path, strength in chain:
        prompt[node_id] = {"class_type": "Hunyuan3LoRA",
                           "inputs": {"model": [upstream, 0], "lora_name": path, "strength": strength}}
        upstream = node_id
    if generator:
        prompt["9"] = {"class_type": "Hunyuan3GenerateLargeBudget", "inputs": {"model": [upstream, 0]}}
    return prompt


def _loaded(model):
    return types.SimpleNamespace(model=model, loras=[])


def test_node_is_registered_and_its_inputs_need_no_comfyui():
    from comfyui_headroom import nodes
    from comfyui_headroom.nodes.hunyuan3_lora_node import Hunyuan3LoRA

    assert nodes.NODE_CLASS_MAPPINGS["Hunyuan3LoRA"] is Hunyuan3LoRA
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["Hunyuan3LoRA"] == "Hunyuan 3 LoRA"
    spec = Hunyuan3LoRA.INPUT_TYPES()
    assert spec["required"]["model"] == ("HUNYUAN3_MODEL",)
    strength = spec["required"]["strength"][1]
    assert (strength["min"], strength["max"], strength["default"]) == (-4.0, 4.0, 1.0)
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}
    assert Hunyuan3LoRA.RETURN_TYPES == ("HUNYUAN3_MODEL", "STRING")


def test_chained_nodes_rerunning_only_the_second_gives_the_full_runs_stack(fresh, tmp_path):
    from comfyui_headroom.nodes.hunyuan3_lora_node import Hunyuan3LoRA

    a = lora_factors(fresh, TARGETS, seed=1)
    b = lora_factors(fresh, [ATTN, EXPERT], seed=2)
    pa, pb = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    loaded, x = _loaded(fresh), tokens()
    first, second = Hunyuan3LoRA(), Hunyuan3LoRA()
    prompt = _prompt([("2", pa, 1.0), ("3", pb, 0.5)])
    out = first.apply(loaded, pa, 1.0, unique_id="2", prompt=prompt)["result"][0]
    assert out is loaded
    out, status = second.apply(out, pb, 0.5, unique_id="3", prompt=prompt)["result"]
    assert out is loaded and "b.safetensors x 0.5" in status
    assert [(e.path, e.strength) for e in loaded.loras] == [(pa, 1.0), (pb, 0.5)]
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 1.0), (b, 0.5)]), x), atol=2e-5, rtol=1e-5)
    # the user changes the 2nd node's strength; ComfyUI re-runs only that node, on the cached model object
    for s in (-1.0, 2.0):
        prompt = _prompt([("2", pa, 1.0), ("3", pb, s)])
        second.apply(loaded, pb, s, unique_id="3", prompt=prompt)
        assert [(e.path, e.strength) for e in loaded.loras] == [(pa, 1.0), (pb, s)]
        torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 1.0), (b, s)]), x), atol=2e-5, rtol=1e-5)
    assert hook_count(fresh) == 6
    # the 1st node changes: ComfyUI runs both again
    prompt = _prompt([("2", pa, 0.25), ("3", pb, 2.0)])
    first.apply(loaded, pa, 0.25, unique_id="2", prompt=prompt)
    second.apply(loaded, pb, 2.0, unique_id="3", prompt=prompt)
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 0.25), (b, 2.0)]), x), atol=2e-5, rtol=1e-5)
    # what a generator fed by node 3 / by node 2 (node 3 removed) / by the loader should sample with
    assert [(e.path, e.strength) for e in stack_for_consumer(prompt, "9")] == [(pa, 0.25), (pb, 2.0)]
    assert [(e.path, e.strength) for e in stack_for_consumer(_prompt([("2", pa, 0.25)]), "9")] == [(pa, 0.25)]
    assert stack_for_consumer(_prompt([]), "9") == []
    assert stack_for_consumer(None, "9") is None


def test_an_upstream_strength_through_a_link_comes_from_what_that_node_ran_with(fresh, tmp_path):
    from comfyui_headroom.nodes.hunyuan3_lora_node import Hunyuan3LoRA

    a, b = lora_factors(fresh, [ATTN], seed=1), lora_factors(fresh, [SHARED], seed=2)
    pa, pb = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    prompt = _prompt([("12", pa, 0.0), ("13", pb, 1.0)])
    prompt["12"]["inputs"]["strength"] = ["20", 0]  # a FLOAT from another node
    prompt["20"] = {"class_type": "SomeFloat", "inputs": {}}
    loaded = _loaded(fresh)
    Hunyuan3LoRA().apply(loaded, pa, 0.6, unique_id="12", prompt=prompt)
    Hunyuan3LoRA().apply(loaded, pb, 1.0, unique_id="13", prompt=prompt)
    assert [(e.path, e.strength) for e in loaded.loras] == [(pa, 0.6), (pb, 1.0)]


def test_without_a_prompt_the_node_replaces_its_own_entry(fresh, tmp_path):
    from comfyui_headroom.nodes.hunyuan3_lora_node import Hunyuan3LoRA, node_stack

    a, b = lora_factors(fresh, [ATTN], seed=1), lora_factors(fresh, [SHARED], seed=2)
    pa, pb = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    loaded, x = _loaded(fresh), tokens()
    first, second = Hunyuan3LoRA(), Hunyuan3LoRA()
    first.apply(loaded, pa, 1.0)
    second.apply(loaded, pb, 0.5)
    second.apply(loaded, pb, -0.5)  # only the 2nd again: its own entry is replaced, not added
    assert [(e.path, e.strength) for e in loaded.loras] == [(pa, 1.0), (pb, -0.5)]
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 1.0), (b, -0.5)]), x), atol=2e-5, rtol=1e-5)
    assert [e.strength for e in node_stack(loaded.loras, pa, 3.0, f"instance-{id(first)}")] == [3.0, -0.5]
    # without ComfyUI: a path; with ComfyUI importable (CI's test run): a name in its loras folders
    with pytest.raises(ValueError, match="missing.safetensors.*(not an existing absolute path|not found in the loras)"):
        first.apply(loaded, "missing.safetensors", 1.0)


def test_a_generator_samples_with_the_stack_of_its_own_input(fresh, tmp_path):
    from comfyui_headroom.nodes.hunyuan3_lora_node import (
        Hunyuan3LoRA,
        sync_for_generator,
    )

    a, b = lora_factors(fresh, [ATTN], seed=1), lora_factors(fresh, [SHARED], seed=2)
    pa, pb = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    loaded, x = _loaded(fresh), tokens()
    base = run(fresh, x)
    prompt = _prompt([("2", pa, 1.0), ("3", pb, 1.0)])
    Hunyuan3LoRA().apply(loaded, pa, 1.0, unique_id="2", prompt=prompt)
    Hunyuan3LoRA().apply(loaded, pb, 1.0, unique_id="3", prompt=prompt)
    assert sync_for_generator(loaded, prompt, "9") is None  # already the stack of its input
    # node 3 deleted, node 2 stays cached (does not run): the generator's own chain decides
    sync_for_generator(loaded, _prompt([("2", pa, 1.0)]), "9")
    assert [(e.path, e.strength) for e in loaded.loras] == [(pa, 1.0)]
    torch.testing.assert_close(run(fresh, x), run(merged(fresh, [(a, 1.0)]), x), atol=2e-5, rtol=1e-5)
    # every LoRA node deleted: the loader's (cached) model is sampled without LoRA
    sync_for_generator(loaded, _prompt([]), "9")
    assert loaded.loras == [] and hook_count(fresh) == 0 and torch.equal(run(fresh, x), base)
    # no prompt (a script): the model's stack stays as it is
    apply_stack(loaded, [LoraEntry(pb, 0.5)])
    assert sync_for_generator(loaded) is None and hook_count(fresh) == 1


def test_a_hooked_layer_called_with_a_keyword_input_gets_its_branch(fresh, tmp_path):
    a = lora_factors(fresh, [O_PROJ], seed=4)
    apply_hunyuan3_loras(fresh, [(write_lora(tmp_path / "a.safetensors", a), 1.0)])
    layer = fresh.get_submodule(O_PROJ)
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(input=x), layer(x))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight + delta(a, O_PROJ)), atol=1e-5, rtol=1e-5)


def test_headroom_int8_engine_takes_lora_on_stacked_experts_and_int8_attention(fake_folder, tmp_path):
    """Our INT8 engine's model (Int8Linear attention, experts stacked for the grouped kernel): the branches land on
    the stack's expert and on the attention layer, change the output, and clearing gives the exact output back."""
    from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model

    loaded = load_hf_model(fake_folder, "int8", trust_remote_code=True)
    assert loaded.engine == "headroom-int8"
    reference = load_hf_model(fake_folder, "bf16", trust_remote_code=True)
    factors = lora_factors(reference.model, [EXPERT, ATTN], alpha=4.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    device = loaded.model.model.wte.weight.device  # the GPU on a CUDA machine: the grouped kernel runs there
    x = torch.randn(1, 40, 128, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    with torch.no_grad():
        before = loaded.model.model(x).float()
        apply_stack(loaded, [LoraEntry(path, 1.0)])
        parts = EXPERT.split(".")  # model.layers.N.mlp.experts.E.proj
        stack = loaded.model.get_submodule(".".join(parts[:-2] + [parts[-1]]))
        attn = loaded.model.get_submodule(ATTN)
        assert isinstance(stack, Int8GroupedLinear) and list(stack.lora) == [int(parts[-2])]
        assert isinstance(attn, Int8Linear) and len(attn.lora) == 1
        with_lora = loaded.model.model(x).float()
        clear_hunyuan3_loras(loaded.model)
        after = loaded.model.model(x).float()
    assert not torch.equal(with_lora, before)
    assert torch.equal(after, before)
