"""Fused INT8 Kandinsky 5 blocks (integrations/comfyui/fused/kandinsky5.py) inside a real ComfyUI, on the CPU.

One tiny Kandinsky 5 (video) with seeded random weights, loaded through ComfyUI's own model detection (a width it
does not know gets the lite video's 64-wide heads), fused ``on`` (torch producers + reference GEMM) and ``off``
(ComfyUI's own block code on the same INT8 layers), sampled with KSampler on a 5-D video latent.
"""

import comfy.ldm.kandinsky5.model as k5
import comfy.ops
import comfy.sd
import pytest
import torch
from comfyui_headroom.quant.linear import Int8Linear
from fused_util import (
    count_one_pass_calls,
    load,
    random_state,
    sample_falling_back,
    sample_fused_and_unfused,
    with_lora,
    with_transformer_option,
)
from safetensors.torch import save_file

DIM, TEXT, POOLED = 128, 3584, 768  # ComfyUI's detection reads neither text width: the class defaults
ATTENTION = ("to_query", "to_key", "to_value", "out_layer")


@pytest.fixture(scope="module")
def k5_file(workdir):
    model = k5.Kandinsky5(model_dim=DIM, time_dim=64, ff_dim=256, num_text_blocks=1, num_visual_blocks=2,
                          dtype=torch.bfloat16, operations=comfy.ops.manual_cast)
    path = workdir / "kandinsky5_fused.safetensors"
    save_file(random_state(model, 0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(k5_file):
    return {mode: load(k5_file, mode, min_features=64) for mode in ("on", "off")}


@pytest.fixture(scope="module")
def conditioning():
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 8, TEXT, generator=g), {"pooled_output": torch.randn(1, POOLED, generator=g)}]]
    return torch.randn(1, 16, 2, 8, 8, generator=g), cond(), cond()


def test_detection_builds_kandinsky5_with_int8_block_layers(models):
    for patcher in models.values():
        assert type(patcher.model).__name__ == "Kandinsky5"
        net = patcher.model.diffusion_model
        assert type(net) is k5.Kandinsky5 and net.model_dim == DIM
        layers = [f"self_attention.{n}" for n in ATTENTION] + ["feed_forward.in_layer", "feed_forward.out_layer"]
        for blocks, names in ((net.text_transformer_blocks, layers),
                              (net.visual_transformer_blocks, layers + [f"cross_attention.{n}" for n in ATTENTION])):
            for block in blocks:
                for name in names:
                    layer = block.get_submodule(name)
                    assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8, name


def test_fused_kandinsky5_samples_like_comfyuis_block_code(models, conditioning, monkeypatch):
    calls = count_one_pass_calls(monkeypatch)
    # one text (encoder) block, two visual (decoder) blocks
    sample_fused_and_unfused(models, *conditioning, blocks=3)
    assert calls and len(calls) % 3 == 0  # each block's self-attention: q/k norms + RoPE in one pass


def test_self_attention_inputs_in_one_pass_equal_comfyuis_norm_and_rope():
    """The fused self-attention's q/k norms + RoPE against ComfyUI's modules and apply_rope1 on Kandinsky 5's
    ``[B, N, 1, D/2, 2, 2]`` RoPE (its model's 3-D rope_encode)."""
    import comfy.ldm.kandinsky5.model as k5
    import comfy.ops
    from comfyui_headroom.integrations.comfyui.fused.pieces import joint_heads

    g = torch.Generator().manual_seed(5)
    attn = k5.SelfAttention(256, 128, operation_settings={"operations": comfy.ops.manual_cast,
                                                          "dtype": torch.bfloat16})
    with torch.no_grad():
        attn.query_norm.weight.copy_(1 + 0.1 * torch.randn(128, generator=g))
        attn.key_norm.weight.copy_(1 + 0.1 * torch.randn(128, generator=g))
    embed = k5.EmbedND(dim=128, theta=10000.0, axes_dim=[16, 56, 56])
    freqs = embed(torch.randint(0, 16, (1, 10, 3), generator=g).float()).movedim(1, 2)  # as rope_encode_3d
    q, k, v = (torch.randn(1, 10, 2, 128, generator=g).to(torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        fused = joint_heads([(q, k, v, attn.query_norm, attn.key_norm)], freqs.movedim(1, 2))
        want = (k5.apply_rope1(attn.query_norm(q), freqs), k5.apply_rope1(attn.key_norm(k), freqs), v)
    for got, ref in zip(fused, want):
        ref = ref.transpose(1, 2)
        assert got.shape == ref.shape == (1, 2, 10, 128)
        assert (got == ref).float().mean() > 0.999
        torch.testing.assert_close(got, ref, rtol=2 ** -8, atol=1e-6)


def test_attention_override_takes_comfyuis_forward(models, conditioning):
    seen = []

    def override(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs) * 1.25

    sample_falling_back(models, *conditioning, with_transformer_option("optimized_attention_override", override),
                        "transformer_options optimized_attention_override")
    assert seen


def test_lora_still_applies_through_comfyuis_forward(models, conditioning):
    g = torch.Generator().manual_seed(2)
    targets = ["text_transformer_blocks.0.self_attention.to_value",
               "visual_transformer_blocks.0.cross_attention.to_key",
               "visual_transformer_blocks.1.feed_forward.in_layer"]
    lora = {}
    for name in targets:  # one layer of every block: every call takes ComfyUI's forward
        out_f = 256 if name.endswith("in_layer") else DIM
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.1 * torch.randn(out_f, 8, generator=g)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.1 * torch.randn(8, DIM, generator=g)
    sample_falling_back(models, *conditioning, with_lora(lora), "LoRA side branch")
