"""Fused INT8 Qwen-Image block (integrations/comfyui/fused/qwen_image.py) inside a real ComfyUI, on the CPU.

``fuse_blocks="on"`` runs the fused forward with the torch producers and the reference GEMM (the code path a GPU
takes: producer rows -> ``forward_int8``); ``off`` is ComfyUI's own block code on the same INT8 layers.

ComfyUI's Qwen-Image detection reads only ``in_channels`` and the block count from a state dict; the width comes
from ``supported_models.QwenImage``'s config (24 heads of 128, text width 3584), far too wide for a CPU test. The
tiny model here keeps detection and ComfyUI's model classes but sets that config to 2 heads of 64 and a 64-wide
text context for this module's loads (``unet_extra_config``, which ComfyUI merges into the detected config).
"""

import pytest
import torch
from comfyui_headroom.integrations.comfyui.fused import install_fused_blocks
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig, make_int8_ops
from comfyui_headroom.quant.linear import Int8Linear
from fused_util import (
    cosine,
    count_one_pass_calls,
    ksample,
    load,
    sample_falling_back,
    sample_fused_and_unfused,
    stats,
    with_lora,
)
from safetensors.torch import save_file

TINY = {"num_attention_heads": 2, "attention_head_dim": 64, "joint_attention_dim": 64, "axes_dims_rope": (16, 24, 24)}
DEPTH = 2
TEXT_TOKENS = 10


def _tiny_model(operations, dtype=torch.bfloat16, **config):
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(num_layers=DEPTH, in_channels=64, image_model="qwen_image",
                                       operations=operations, dtype=dtype, **{**TINY, **config})


def _random_weights(state: dict, seed: int) -> dict:
    """Seeded values of a sensible scale: matrices 0.05, norm weights ones, biases 0.01."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in state.items():
        if t.ndim >= 2:
            value = torch.randn(t.shape, generator=g) * 0.05
        elif "norm" in key:
            value = torch.ones(t.shape)
        else:
            value = torch.randn(t.shape, generator=g) * 0.01
        out[key] = value.to(t.dtype).contiguous()
    return out


@pytest.fixture(scope="module")
def tiny_config():
    import comfy.supported_models

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.supported_models.QwenImage, "unet_extra_config", dict(TINY))
        yield


@pytest.fixture(scope="module")
def qwen_file(workdir, tiny_config):
    import comfy.ops

    path = workdir / "qwen_image_fused.safetensors"
    save_file(_random_weights(_tiny_model(comfy.ops.manual_cast).state_dict(), seed=0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(qwen_file):
    return {mode: load(qwen_file, mode, min_features=64) for mode in ("on", "off")}


@pytest.fixture(scope="module")
def conditioning():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, -3:] = 0  # padded text tokens: ComfyUI turns the mask into an additive one on the text keys
    cond = lambda extra: [[torch.randn(1, TEXT_TOKENS, TINY["joint_attention_dim"], generator=g), extra]]
    return torch.randn(1, 16, 8, 8, generator=g), cond({}), cond({}), cond({"attention_mask": mask})


def test_detection_builds_qwen_image_with_int8_block_layers(models):
    import comfy.ldm.qwen_image.model as qwen_model
    import comfy.model_base

    for patcher in models.values():
        assert type(patcher.model) is comfy.model_base.QwenImage
        net = patcher.model.diffusion_model
        assert isinstance(net, qwen_model.QwenImageTransformer2DModel) and net.inner_dim == 128
        assert len(net.transformer_blocks) == DEPTH
        for block in net.transformer_blocks:
            assert isinstance(block, qwen_model.QwenImageTransformerBlock)
            attn = block.attn
            fused_layers = (attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                            attn.to_out[0], attn.to_add_out, block.img_mlp.net[0].proj, block.img_mlp.net[2],
                            block.txt_mlp.net[0].proj, block.txt_mlp.net[2])
            for layer in fused_layers:
                assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8


def test_fused_qwen_image_samples_like_comfyuis_block_code(models, conditioning, monkeypatch):
    latent, positive, negative, _ = conditioning
    calls = count_one_pass_calls(monkeypatch)
    # The sampled latent of this tiny model is dominated by its input and output layers, so the blocks' share is
    # small: a bound tighter than the usual 0.999 (about 5e-7 from 1 here; swapping two gates gives 2e-3).
    sample_fused_and_unfused(models, latent, positive, negative, blocks=DEPTH, min_cosine=0.99999)
    assert calls and len(calls) % (2 * DEPTH) == 0  # the q/k norms + RoPE in one pass, per stream and block


def test_attention_inputs_fall_back_to_comfyuis_ops_when_apply_rope1_is_replaced(models, conditioning, monkeypatch):
    import comfy.ldm.qwen_image.model as qwen_model
    from comfyui_headroom.integrations.comfyui.fused import pieces

    latent, positive, negative, _ = conditioning
    reference = ksample(models["on"], latent, positive, negative)
    original = qwen_model.apply_rope1
    replaced = []
    monkeypatch.setattr(qwen_model, "apply_rope1", lambda x, pe: replaced.append(1) or original(x, pe))
    monkeypatch.setattr(pieces, "qk_norm_rope", lambda *a, **kw: pytest.fail("the one-pass path ran"))
    before = stats(models["on"])["fallback_calls"]
    again = ksample(models["on"], latent, positive, negative)
    assert replaced and stats(models["on"])["fallback_calls"] == before  # still the fused block, ComfyUI's RoPE
    assert cosine(again, reference) >= 0.99999


def test_text_attention_mask_is_honoured(models, conditioning):
    latent, positive, negative, masked = conditioning
    before = stats(models["on"])["fused_calls"]
    fused, plain = (ksample(models[m], latent, masked, negative) for m in ("on", "off"))
    assert stats(models["on"])["fused_calls"] > before and stats(models["on"])["fallback_calls"] == 0
    assert cosine(fused, plain) >= 0.99999
    unmasked = ksample(models["off"], latent, positive, negative)
    assert (fused - plain).norm() < 0.25 * (plain - unmasked).norm()  # a fused path ignoring the mask fails here


def test_attention_patch_takes_comfyuis_forward(models, conditioning):
    latent, positive, negative, _ = conditioning
    seen = []

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.append(q.shape)
        return {"q": q * 1.5, "v": v * 2}

    def prepare(base):
        patched = base.clone()
        patched.set_model_attn1_patch(attn1_patch)
        return patched

    sample_falling_back(models, latent, positive, negative, prepare, "transformer_options patch 'attn1_patch'")
    assert seen


def test_lora_still_applies_through_comfyuis_forward(models, conditioning):
    latent, positive, negative, _ = conditioning
    g = torch.Generator().manual_seed(2)
    lora = {}
    for i in range(DEPTH):  # one linear of every block: no block can take the fused path
        layer = f"diffusion_model.transformer_blocks.{i}.img_mlp.net.0.proj"
        lora[f"{layer}.lora_up.weight"] = torch.randn(512, 8, generator=g) * 0.1
        lora[f"{layer}.lora_down.weight"] = torch.randn(8, 128, generator=g) * 0.1
    sample_falling_back(models, latent, positive, negative, with_lora(lora), "LoRA side branch")


def _block_pair(seed: int):
    """Two copies of ComfyUI's Qwen-Image block (128 wide, 2 heads of 64) with INT8 layers from the same float
    weights: the first gets a fused forward."""
    import comfy.ldm.qwen_image.model as qwen_model
    import comfy.ops

    make = lambda ops: qwen_model.QwenImageTransformerBlock(128, 2, 64, operations=ops, dtype=torch.bfloat16)
    state = _random_weights(make(comfy.ops.manual_cast).state_dict(), seed)
    blocks = []
    for _ in range(2):
        block = make(make_int8_ops(Int8LoadConfig(min_features=64)))
        block.load_state_dict(state)
        blocks.append(block)
    assert install_fused_blocks(blocks[0], "on") == 1
    return blocks


def _block_inputs(g, batch: int, n_img: int = 12, n_txt: int = 6, temb_batch: int | None = None):
    from comfy.ldm.flux.layers import EmbedND

    img, txt = (torch.randn(batch, n, 128, generator=g, dtype=torch.bfloat16) for n in (n_img, n_txt))
    temb = torch.randn(temb_batch or batch, 128, generator=g, dtype=torch.bfloat16)
    ids = torch.randn(batch, n_txt + n_img, 3, generator=g) * 4
    pe = EmbedND(dim=64, theta=10000, axes_dim=[16, 24, 24])(ids).to(torch.bfloat16).contiguous()
    mask = torch.zeros(batch, n_txt, dtype=torch.bfloat16)
    mask[:, -2:] = torch.finfo(torch.bfloat16).min
    return {"hidden_states": img, "encoder_hidden_states": txt, "encoder_hidden_states_mask": mask, "temb": temb,
            "image_rotary_emb": pe}


def test_block_batch_of_two_with_mask():
    g = torch.Generator().manual_seed(3)
    fused, plain = _block_pair(1)
    inputs = _block_inputs(g, 2)
    with torch.no_grad():
        a = fused(**inputs)
        b = plain(**inputs)
    assert fused._headroom_fused_calls == 1
    for x, y in zip(a, b):
        assert x.shape == y.shape and cosine(x, y) >= 0.999


def test_timestep_zero_index_and_unknown_arguments_fall_back():
    g = torch.Generator().manual_seed(4)
    fused, plain = _block_pair(5)
    inputs = _block_inputs(g, 1, temb_batch=2)  # Qwen-Image-Edit 2511: the reference tokens get timestep 0
    with torch.no_grad():
        a = fused(**inputs, timestep_zero_index=8)
        b = plain(**inputs, timestep_zero_index=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert fused._headroom_fallbacks["timestep_zero_index (per-token modulation)"] == 1
    with torch.no_grad(), pytest.raises(TypeError):  # ComfyUI's own forward rejects what it does not know
        fused(**_block_inputs(g, 1), some_new_option=1)
    assert fused._headroom_fallbacks["unknown arguments ['some_new_option']"] == 1
    assert fused._headroom_fused_calls == 0
