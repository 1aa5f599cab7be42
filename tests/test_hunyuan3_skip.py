"""The HunyuanImage-3 skip list for bitsandbytes: exactly the intended layers, under transformers' own matching."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from comfyui_headroom.integrations.hunyuan3.bnb import (
    HUNYUAN3_SKIP_PATTERNS,
    SkipListMismatch,
    SkipPlan,
    bnb_skip_modules,
    convertible_linears,
    plan_skips,
    transformers_keeps,
    verify_skip_plan,
)

FAKE = Path(__file__).parent / "fixtures" / "hunyuan3_fake" / "modeling_hunyuan3_fake.py"
CRITICAL_TOP = ("vae", "vision_model", "vision_aligner", "timestep_emb", "patch_embed", "time_embed",
                "final_layer", "time_embed_2", "lm_head")


def _fake_module():
    spec = importlib.util.spec_from_file_location("hunyuan3_fake_modeling", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def skeleton():
    fake = _fake_module()
    with torch.device("meta"):
        return fake.HunyuanImage3ForCausalMM(fake.HunyuanImage3Config(num_hidden_layers=3, num_experts=4))


def intended_float(name: str) -> bool:
    """Written independently of the pattern list: what must stay full precision."""
    top = name.split(".")[0]
    return (top in CRITICAL_TOP or ".self_attn." in name
            or re.fullmatch(r"model\.layers\.\d+\.mlp\.gate\.wg", name) is not None)


def test_defaults_keep_exactly_the_intended_layers_and_quantize_every_expert(skeleton):
    plan = bnb_skip_modules(skeleton, HUNYUAN3_SKIP_PATTERNS)
    names = convertible_linears(skeleton)
    assert set(plan.keep) == {n for n in names if intended_float(n)}
    assert set(plan.quantize) == {n for n in names if not intended_float(n)}
    experts = [n for n in names if ".mlp.experts." in n]
    assert len(experts) == 3 * 4 * 2 and set(experts) <= set(plan.quantize)
    assert all(f"model.layers.{i}.mlp.gate.wg" in plan.keep for i in range(3))
    # and the list handed to transformers means the same under its matcher
    for name in names:
        assert transformers_keeps(name, plan.modules_to_not_convert) == intended_float(name), name
    # compact: whole modules, not one entry per layer of the VAE / vision tower
    assert "vision_model" in plan.modules_to_not_convert and "model.layers.0.self_attn" in plan.modules_to_not_convert
    assert len(plan.modules_to_not_convert) <= 8 + 2 * 3


def test_plain_substring_mlp_gate_would_also_keep_the_shared_mlp_in_float(skeleton):
    names = convertible_linears(skeleton)
    plan = plan_skips(names, ["mlp.gate"])
    # "mlp.gate" is a substring of "shared_mlp.gate_and_up_proj": the bug the router pattern avoids
    assert "model.layers.0.mlp.shared_mlp.gate_and_up_proj" in plan.keep
    assert "model.layers.0.mlp.shared_mlp.gate_and_up_proj" in bnb_skip_modules(skeleton, HUNYUAN3_SKIP_PATTERNS).quantize


def test_seed_000_raw_names_do_not_match_under_transformers_5():
    # transformers 5 matches a key at the start of the name (or as a suffix), so the seed's "self_attn" keeps
    # nothing: the reason the list is resolved against the module tree.
    assert not transformers_keeps("model.layers.0.self_attn.qkv_proj", ["self_attn"])
    assert transformers_keeps("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn"])
    assert not transformers_keeps("model.layers.10.self_attn.qkv_proj", ["model.layers.1.self_attn"])


def test_a_wrong_list_is_refused_before_loading(skeleton):
    names = convertible_linears(skeleton)
    good = bnb_skip_modules(skeleton, HUNYUAN3_SKIP_PATTERNS)
    bad = SkipPlan(keep=good.keep, quantize=good.quantize, modules_to_not_convert=["vae", "model.layers"])
    with pytest.raises(SkipListMismatch, match="should be quantized"):
        verify_skip_plan(bad)
    assert names
