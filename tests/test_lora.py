"""quant/lora.py: ComfyUI-style LoRA patches as float side branches on INT8 layers (no ComfyUI needed).

A patch here has ComfyUI's shape ``(strength, adapter, strength_model, offset, function)``; the adapter is a
plain holder with ComfyUI's LoRAAdapter fields (``name == "lora"``, ``weights = (up, down, alpha, mid,
dora_scale, reshape)``) - the real ComfyUI objects are exercised in tests/integration/inproc.
"""

from types import SimpleNamespace

import pytest
import torch
from comfyui_headroom.kernels.int8 import quantize_weight
from comfyui_headroom.kernels.rotation import quantize_rotated
from comfyui_headroom.quant import Int8Linear, relative_error
from comfyui_headroom.quant.formats import encode_comfy_quant
from comfyui_headroom.quant.lora import (
    LoraShapeError,
    PreparedCache,
    UnsupportedPatchError,
    apply_side_branches,
    dequantize_int8_lora,
    patch_shape_problems,
    side_branches,
)
from comfyui_headroom.quant.rotation import comfy_quant_config
from torch import nn


def adapter(up, down, alpha=None, mid=None, dora=None, reshape=None, name="lora"):
    return SimpleNamespace(name=name, weights=(up, down, alpha, mid, dora, reshape))


def lora_pair(gen, out_f, in_f, rank=4, std=0.05):
    return torch.randn(out_f, rank, generator=gen) * std, torch.randn(rank, in_f, generator=gen) * std


def test_side_branch_equals_merged_weight(gen):
    lin = nn.Linear(1024, 1024)
    layer = Int8Linear.from_linear(lin, compute_dtype=torch.float32)
    up, down = lora_pair(gen, 1024, 1024, rank=8)
    patch = (0.7, adapter(up, down, alpha=4.0), 1.0, None, None)
    layer.lora = side_branches([patch], "x.weight", 1024, 1024, dtype=torch.float32)
    merged = nn.Linear(1024, 1024)
    with torch.no_grad():
        merged.weight.copy_(lin.weight + 0.7 * (4.0 / 8) * up @ down)
        merged.bias.copy_(lin.bias)
    x = torch.randn(3, 1024, generator=gen)
    with torch.no_grad():
        err = relative_error(layer(x), merged(x))
        effect = relative_error(lin(x), merged(x))
    assert err < 0.02 and effect > 5 * err
    assert layer.weight.dtype == torch.int8  # never merged


def test_offset_patch_lands_on_its_slice(gen):
    up, down = lora_pair(gen, 256, 1024)
    branches = side_branches([(1.0, adapter(up, down), 1.0, (0, 512, 256), None)], "k", 1024, 1024,
                             dtype=torch.float32)
    (d, u, scale), = branches
    dense = scale * u @ d
    assert torch.allclose(dense[512:768], up @ down, atol=1e-6)
    assert dense[:512].abs().max() == 0 and dense[768:].abs().max() == 0


@pytest.mark.parametrize("patch,match", [
    ((1.0, adapter(torch.ones(8, 2), torch.ones(2, 8), name="loha"), 1.0, None, None), "loha"),
    ((1.0, ("diff", (torch.ones(8, 8),)), 1.0, None, None), "diff"),
    ((1.0, ("set", (torch.ones(8, 8),)), 1.0, None, None), "set"),
    ((1.0, [(torch.ones(8, 8), None)], 1.0, None, None), "merged"),
    ((1.0, adapter(torch.ones(8, 2), torch.ones(2, 8), dora=torch.ones(8)), 1.0, None, None), "DoRA"),
    ((1.0, adapter(torch.ones(8, 2), torch.ones(2, 8)), 0.5, None, None), "strength_model"),
    ((1.0, adapter(torch.ones(8, 2), torch.ones(2, 8)), 1.0, None, lambda w: w), "function"),
])
def test_unsupported_patches_are_refused_by_name(patch, match):
    with pytest.raises(UnsupportedPatchError, match=match):
        side_branches([patch], "blocks.0.q.weight", 8, 8)


def test_shape_mismatch_is_an_error(gen):
    up, down = lora_pair(gen, 512, 1024)
    with pytest.raises(LoraShapeError, match="512x1024 vs layer 1024x1024"):
        side_branches([(1.0, adapter(up, down), 1.0, None, None)], "k", 1024, 1024)
    problems = patch_shape_problems({"a.weight": adapter(up, down), "b.weight": adapter(*lora_pair(gen, 64, 64))},
                                    {"a.weight": (1024, 1024), "b.weight": (64, 64)})
    assert problems == ["a.weight: LoRA delta 512x1024 vs layer 1024x1024"]


def test_prepared_cache_is_reused_and_bounded(gen):
    cache = PreparedCache(max_bytes=3 * (4 * 1024 * 4 * 2))  # room for three fp32 rank-4 1024x1024 pairs
    pairs = [lora_pair(gen, 1024, 1024) for _ in range(5)]
    first = side_branches([(1.0, adapter(*pairs[0]), 1.0, None, None)], "k", 1024, 1024, dtype=torch.float32, cache=cache)
    again = side_branches([(0.3, adapter(*pairs[0]), 1.0, None, None)], "k", 1024, 1024, dtype=torch.float32, cache=cache)
    assert again[0][0] is first[0][0] and again[0][2] == pytest.approx(0.3) and cache.hits == 1
    for up, down in pairs[1:]:
        side_branches([(1.0, adapter(up, down), 1.0, None, None)], "k", 1024, 1024, dtype=torch.float32, cache=cache)
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes


def test_apply_side_branches_in_input_dtype(gen):
    up, down = lora_pair(gen, 64, 32)
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16)
    y = apply_side_branches(x, torch.zeros(2, 64, dtype=torch.bfloat16), [(down, up, 2.0)])
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), 2.0 * (x.float() @ down.T) @ up.T) < 0.02


def test_int8_lora_file_is_dequantized_once(gen):
    up, down = lora_pair(gen, 1024, 1024, rank=16, std=0.1)
    q_up, s_up = quantize_weight(up, "rowwise")
    q_down, s_down = quantize_rotated(down, 256)  # a rotated factor in ComfyUI's convrot layout
    lora = {"lora_unet_a.lora_up.weight": q_up, "lora_unet_a.lora_up.weight_scale": s_up,
            "lora_unet_a.lora_down.weight": q_down, "lora_unet_a.lora_down.weight_scale": s_down[:, None],
            "lora_unet_a.lora_down.comfy_quant": encode_comfy_quant(comfy_quant_config(256)),
            "lora_unet_a.alpha": torch.tensor(16.0)}
    out, count = dequantize_int8_lora(lora)
    assert count == 2
    assert set(out) == {"lora_unet_a.lora_up.weight", "lora_unet_a.lora_down.weight", "lora_unet_a.alpha"}
    assert relative_error(out["lora_unet_a.lora_up.weight"], up) < 0.01
    assert relative_error(out["lora_unet_a.lora_down.weight"], down) < 0.01  # un-rotated, not left rotated


@pytest.mark.parametrize("alpha, message", [(float("nan"), "alpha is nan"), (float("inf"), "alpha is inf"),
                                            (torch.ones(2), r"alpha has shape \(2,\)"), ("x", "is not a number")])
def test_a_damaged_alpha_is_refused_naming_the_layer(alpha, message):
    from comfyui_headroom.quant.lora import LoraShapeError, low_rank_of

    class Adapter:  # what ComfyUI's LoRA patch holds (weights = up, down, alpha, mid, dora_scale, reshape)
        name = "lora"
        weights = (torch.ones(8, 2), torch.ones(2, 4), alpha, None, None, None)

    with pytest.raises(LoraShapeError, match=rf"blocks\.0\.qkv\.weight: .*{message}"):
        low_rank_of((1.0, Adapter(), 1.0, None, None), "blocks.0.qkv.weight")


def test_a_bad_lora_cache_size_is_named(monkeypatch):
    from comfyui_headroom.quant.lora import _cache_limit_bytes

    monkeypatch.setenv("HEADROOM_LORA_CACHE_MB", "garbage")
    with pytest.raises(ValueError, match="HEADROOM_LORA_CACHE_MB='garbage': give the LoRA cache size in MB"):
        _cache_limit_bytes()
    monkeypatch.setenv("HEADROOM_LORA_CACHE_MB", "16")
    assert _cache_limit_bytes() == 16 * 2**20
