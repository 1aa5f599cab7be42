"""Fused INT8 Lumina 2 / Z-Image blocks (integrations/comfyui/fused/lumina.py) inside a real ComfyUI, on the CPU.

One tiny Z-Image-style NextDiT (``z_image_modulation``, pad tokens, SwiGLU, q/k norm) is written with seeded random
weights and loaded through ComfyUI's model detection, fused ``on`` (torch producers + reference GEMM: the code path a
GPU takes) and ``off`` (ComfyUI's own block code on the same INT8 layers), then sampled with KSampler.

ComfyUI's detection knows head counts and RoPE axes only for the real widths (2304: Lumina 2, 3840: Z-Image) and
otherwise implies 128-wide heads of a 4096-wide model; the tests wrap ``detect_unet_config`` to give a 256-wide
model Z-Image's settings at 4 heads of 64 (everything else - the ``lumina2`` choice, width, depth, caption width,
pad tokens - is detection's own).
"""

import comfy.ldm.lumina.model as lumina
import comfy.model_detection
import comfy.ops
import comfy.sd
import pytest
import torch
from comfyui_headroom.integrations.comfyui.fused import install_fused_blocks
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig, make_int8_ops
from comfyui_headroom.quant.linear import Int8Linear
from fused_util import (
    cosine,
    load,
    random_state,
    sample_falling_back,
    sample_fused_and_unfused,
    with_lora,
    with_transformer_option,
)
from safetensors.torch import save_file

DIM, CAP = 256, 64
TINY_ZIMAGE = {"n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512],
               "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0}
FUSED_LAYERS = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@pytest.fixture(scope="module")
def tiny_detection():
    """ComfyUI's detection, with Z-Image's head / RoPE settings for the tiny width (see the module docstring)."""
    detect = comfy.model_detection.detect_unet_config

    def detect_tiny(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        if config and config.get("image_model") == "lumina2" and config.get("dim") == DIM:
            config.update(TINY_ZIMAGE)
        return config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy.model_detection, "detect_unet_config", detect_tiny)
        yield


@pytest.fixture(scope="module")
def zimage_file(workdir):
    model = lumina.NextDiT(patch_size=2, in_channels=16, dim=DIM, n_layers=2, cap_feat_dim=CAP, qk_norm=True,
                           pad_tokens_multiple=32, dtype=torch.bfloat16, operations=comfy.ops.manual_cast,
                           **TINY_ZIMAGE)
    path = workdir / "zimage_fused.safetensors"
    save_file(random_state(model, 0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(zimage_file, tiny_detection):
    return {mode: load(zimage_file, mode, min_features=64) for mode in ("on", "off")}


@pytest.fixture(scope="module")
def conditioning():
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 12, CAP, generator=g), {}]]
    return torch.randn(1, 16, 8, 8, generator=g), cond(), cond()


def test_detection_builds_the_lumina2_model_with_int8_block_layers(models):
    for patcher in models.values():
        assert type(patcher.model).__name__ == "Lumina2"
        net = patcher.model.diffusion_model
        assert type(net) is lumina.NextDiT and net.layers[0].adaLN_modulation[0].in_features == 256  # Z-Image's
        assert (len(net.layers), len(net.noise_refiner), len(net.context_refiner)) == (2, 2, 2)
        for block in (*net.layers, *net.noise_refiner, *net.context_refiner):
            for name in FUSED_LAYERS:
                layer = block.get_submodule(name)
                assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8, name


def test_fused_zimage_samples_like_comfyuis_block_code(models, conditioning):
    # layers, noise refiner (modulated), context refiner (not)
    sample_fused_and_unfused(models, *conditioning, blocks=6)


def test_attention_override_takes_comfyuis_forward(models, conditioning):
    """The one ``transformer_options`` entry the block consults (through ComfyUI's attention wrapper)."""
    seen = []

    def override(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs) * 1.25

    sample_falling_back(models, *conditioning, with_transformer_option("optimized_attention_override", override),
                        "transformer_options optimized_attention_override")
    assert seen


def test_lora_still_applies_through_comfyuis_forward(models, conditioning):
    g = torch.Generator().manual_seed(2)
    lora = {}
    targets = [(f"{group}.{i}.attention.qkv", (3 * DIM, DIM)) for group in ("layers", "context_refiner") for i in (0, 1)]
    targets += [(f"noise_refiner.{i}.feed_forward.w1", (768, DIM)) for i in (0, 1)]
    for name, (out_f, in_f) in targets:  # one layer of every block: every call takes ComfyUI's forward
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.1 * torch.randn(out_f, 8, generator=g)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.1 * torch.randn(8, in_f, generator=g)
    sample_falling_back(models, *conditioning, with_lora(lora), "LoRA side branch")


def _block_pair(seed: int, **kwargs):
    """Two copies of one ComfyUI ``JointTransformerBlock`` with INT8 layers from the same float weights: the first
    gets a fused forward."""
    settings = dict(layer_id=0, dim=DIM, n_heads=4, n_kv_heads=2, multiple_of=256, ffn_dim_multiplier=4.0,
                    norm_eps=1e-5, qk_norm=True, **kwargs)
    ref = lumina.JointTransformerBlock(**settings, operation_settings={"operations": comfy.ops.manual_cast,
                                                                        "dtype": torch.bfloat16})
    state = random_state(ref, seed)
    blocks = []
    for _ in range(2):
        block = lumina.JointTransformerBlock(**settings, operation_settings={
            "operations": make_int8_ops(Int8LoadConfig(min_features=64)), "dtype": torch.bfloat16})
        block.load_state_dict(state)
        blocks.append(block)
    assert install_fused_blocks(blocks[0], "on") == 1
    return blocks


def _freqs(n: int):
    from comfy.ldm.flux.layers import EmbedND

    ids = torch.zeros(1, n, 3)
    ids[0, :, 0] = torch.arange(n)
    ids[0, :, 1] = torch.arange(n) % 5
    return EmbedND(dim=DIM // 4, theta=10000.0, axes_dim=[16, 24, 24])(ids).movedim(1, 2)


@pytest.mark.parametrize("modulation", [True, False])
def test_lumina2_blocks_grouped_query_attention(modulation):
    """Lumina 2's own settings (SiLU + adaLN over a 1024-or-narrower vector, grouped-query attention with fewer k/v
    heads): modulated and unmodulated (context refiner) blocks, batch two, against ComfyUI's forward."""
    g = torch.Generator().manual_seed(3)
    fused, plain = _block_pair(4, modulation=modulation)
    x = torch.randn(2, 24, DIM, generator=g).to(torch.bfloat16)
    adaln = torch.randn(2, DIM, generator=g).to(torch.bfloat16) if modulation else None
    freqs = _freqs(24)
    with torch.no_grad():
        a = fused(x.clone(), None, freqs, adaln)
        b = plain(x.clone(), None, freqs, adaln)
    assert fused._headroom_fused_calls == 1, dict(fused._headroom_fallbacks)
    assert cosine(a - x, b - x) >= 0.999  # the block's update, not just the residual it adds to


def test_per_token_modulation_and_unknown_arguments_fall_back():
    g = torch.Generator().manual_seed(5)
    fused, plain = _block_pair(6)
    x = torch.randn(2, 16, DIM, generator=g).to(torch.bfloat16)
    adaln = torch.randn(2, DIM, generator=g).to(torch.bfloat16)
    freqs, zero_index = _freqs(16), [(8, 16)]
    with torch.no_grad():
        a = fused(x.clone(), None, freqs, adaln, timestep_zero_index=zero_index)
        b = plain(x.clone(), None, freqs, adaln, timestep_zero_index=zero_index)
    assert torch.equal(a, b) and fused._headroom_fallbacks["timestep_zero_index (per-token modulation)"] == 1
    with torch.no_grad(), pytest.raises(TypeError):  # ComfyUI's own forward rejects what it does not know
        fused(x.clone(), None, freqs, adaln, some_new_option=1)
    assert fused._headroom_fallbacks["unknown arguments ['some_new_option']"] == 1
