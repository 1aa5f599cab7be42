"""Fused INT8 Wan blocks (integrations/comfyui/fused/wan.py) inside a real ComfyUI, on the CPU.

A tiny Wan 2.1 t2v (2 blocks, dim 256 = 2 heads of 128 as detection derives them, text_dim 4096 as ComfyUI's
WanModel assumes) is written from ComfyUI's own WanModel, loaded through ComfyUI's model detection with INT8
layers, and sampled with KSampler fused (``on``: torch producers + reference GEMM) and unfused (``off``: ComfyUI's
block code on the same INT8 layers). Block-level tests cover what the t2v model does not reach: the I2V
cross-attention, ``cross_attn_norm`` off, per-token modulation (Wan 2.2 TI2V) and unknown arguments.
"""

import pytest
import torch
from comfyui_headroom.integrations.comfyui.fused import install_fused_blocks
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig, make_int8_ops
from comfyui_headroom.quant.linear import Int8Linear
from fused_util import cosine, load, sample_falling_back, sample_fused_and_unfused, with_lora
from safetensors.torch import save_file

DIM, FFN, HEADS, TEXT_DIM = 256, 512, 2, 4096
FUSED_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def _fill(state: dict, seed: int) -> dict:
    """Seeded values of a sensible scale for a Wan state dict: linear weights ~ 1/sqrt(fan_in), biases small,
    RMSNorm weights ones, norm3 (the cross-attention LayerNorm, weight and bias) near its identity so the fused
    path's fold of its affine parameters is exercised, modulation parameters small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in state.items():
        r = torch.randn(v.shape, generator=g)
        if "norm3" in key:
            t = 1 + 0.3 * r if key.endswith("weight") else 0.1 * r
        elif "norm" in key:
            t = torch.ones(v.shape)
        elif "modulation" in key:
            t = 0.1 * r
        elif key.endswith("bias"):
            t = 0.01 * r
        else:
            t = r / v[0].numel() ** 0.5
        out[key] = t.to(v.dtype).contiguous()
    return out


def wan_state_dict(layers: int = 2, seed: int = 0) -> dict:
    """A tiny Wan 2.1 t2v diffusion model's weights under ComfyUI's own key names (what detection reads)."""
    import comfy.ldm.wan.model as wan_model
    import comfy.ops

    model = wan_model.WanModel(model_type="t2v", dim=DIM, ffn_dim=FFN, num_heads=HEADS, num_layers=layers,
                               in_dim=16, out_dim=16, text_dim=TEXT_DIM, operations=comfy.ops.manual_cast,
                               dtype=torch.bfloat16)
    return _fill(model.state_dict(), seed)


@pytest.fixture(scope="module")
def wan_file(workdir):
    path = workdir / "wan_fused.safetensors"
    save_file(wan_state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(wan_file):
    return {mode: load(wan_file, mode, min_features=64) for mode in ("on", "off")}


@pytest.fixture(scope="module")
def conditioning():
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 12, TEXT_DIM, generator=g), {}]]
    return torch.randn(1, 16, 2, 8, 8, generator=g), cond(), cond()


def test_detection_and_int8_layers(models):
    import comfy.ldm.wan.model as wan_model
    import comfy.model_base
    import comfy.supported_models

    for patcher in models.values():
        assert type(patcher.model) is comfy.model_base.WAN21
        assert type(patcher.model.model_config) is comfy.supported_models.WAN21_T2V
        diffusion = patcher.model.diffusion_model
        assert type(diffusion) is wan_model.WanModel and len(diffusion.blocks) == 2
        for block in diffusion.blocks:
            assert isinstance(block, wan_model.WanAttentionBlock)
            for name in FUSED_LAYERS:
                layer = block.get_submodule(name)
                assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8, name


def test_fused_wan_samples_like_comfyuis_block_code(models, conditioning):
    sample_fused_and_unfused(models, *conditioning, blocks=2)


def _attn1_patch(args):
    return args["x"] * 1.5


def _attn2_patch(args):
    return args["x"] * 0.5


@pytest.mark.parametrize("name, patch", [("attn1_patch", _attn1_patch), ("attn2_patch", _attn2_patch)])
def test_block_patch_takes_comfyuis_forward(models, conditioning, name, patch):
    seen = []

    def counted(args):
        seen.append(args["x"].shape)
        return patch(args)

    def prepare(base):
        patched = base.clone()
        patched.set_model_patch(counted, name)
        return patched

    sample_falling_back(models, *conditioning, prepare, f"transformer_options patch {name!r}")
    assert seen


def test_lora_still_applies_through_comfyuis_forward(models, conditioning):
    g = torch.Generator().manual_seed(2)
    lora = {}
    for layer, (out_f, in_f) in {"blocks.0.ffn.0": (FFN, DIM), "blocks.1.self_attn.q": (DIM, DIM)}.items():
        lora[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(8, in_f, generator=g) * 0.1
        lora[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out_f, 8, generator=g) * 0.1
    sample_falling_back(models, *conditioning, with_lora(lora), "LoRA side branch")


def _block_pair(cross_attn_type: str, seed: int, cross_attn_norm: bool = True):
    """Two WanAttentionBlocks with INT8 layers from the same float weights; the first gets a fused forward."""
    import comfy.ldm.wan.model as wan_model
    import comfy.ops

    make = lambda ops: wan_model.WanAttentionBlock(
        cross_attn_type, DIM, FFN, HEADS, qk_norm=True, cross_attn_norm=cross_attn_norm, eps=1e-6,
        operation_settings={"operations": ops, "dtype": torch.bfloat16})
    state = _fill(make(comfy.ops.manual_cast).state_dict(), seed)
    blocks = []
    for _ in range(2):
        block = make(make_int8_ops(Int8LoadConfig(min_features=64)))
        block.load_state_dict(state)
        blocks.append(block)
    assert install_fused_blocks(blocks[0], "on") == 1
    return blocks


def _inputs(g, batch: int = 2, frames: int = 2, side: int = 4, context: int = 10, per_token: bool = False):
    """x, e, freqs, context of one block call, freqs from ComfyUI's EmbedND as WanModel.rope_encode builds them."""
    from comfy.ldm.flux.layers import EmbedND

    n = frames * side * side
    d = DIM // HEADS
    ids = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in (frames, side, side)),
                                     indexing="ij"), dim=-1).reshape(1, n, 3)
    freqs = EmbedND(dim=d, theta=10000.0, axes_dim=[d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])(ids).movedim(1, 2)
    x = torch.randn(batch, n, DIM, generator=g, dtype=torch.bfloat16)
    e = 0.3 * torch.randn(batch, n if per_token else 1, 6, DIM, generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(batch, context, DIM, generator=g, dtype=torch.bfloat16)
    return x, e, freqs, ctx


@pytest.mark.parametrize("cross_attn_type, cross_attn_norm", [("i2v_cross_attn", True), ("t2v_cross_attn", False)])
def test_i2v_cross_attention_and_plain_norm3(cross_attn_type, cross_attn_norm):
    """The I2V cross-attention (CLIP image tokens ahead of the text) and a block without cross_attn_norm."""
    g = torch.Generator().manual_seed(3)
    fused, plain = _block_pair(cross_attn_type, 1, cross_attn_norm)
    x, e, freqs, ctx = _inputs(g)
    with torch.no_grad():
        a = fused(x.clone(), e=e, freqs=freqs, context=ctx, context_img_len=4)
        b = plain(x.clone(), e=e, freqs=freqs, context=ctx, context_img_len=4)
    assert fused._headroom_fused_calls == 1, dict(fused._headroom_fallbacks)
    assert cosine(a, b) >= 0.999
    # the 3-D e of older callers ([B, 6, C]) takes the same path
    with torch.no_grad():
        a = fused(x.clone(), e=e[:, 0], freqs=freqs, context=ctx, context_img_len=4)
    assert fused._headroom_fused_calls == 2 and cosine(a, b) >= 0.999


def test_norm3_fold_gives_comfyuis_layernorm_rows():
    """The query input of the cross-attention: ComfyUI's ``norm3`` (LayerNorm with weight and bias) of
    ``x + gate * y``, which the fused path hands the producer as modulation rows. (The block's output barely
    shows a wrong fold: the query is RMS-normalized after its projection.)"""
    from comfyui_headroom.integrations.comfyui.fused import wan

    g = torch.Generator().manual_seed(6)
    block = _block_pair("t2v_cross_attn", 7)[1]
    x, y = (torch.randn(2, 32, DIM, generator=g, dtype=torch.bfloat16) for _ in range(2))
    gate = 0.3 * torch.randn(2, 6, DIM, generator=g, dtype=torch.bfloat16)[:, 2]
    with torch.no_grad():
        (q, scale), x_new = wan._norm3_rows(block.norm3, x, y, gate)
        expected_x = torch.addcmul(x, y, gate[:, None])
        expected = block.norm3(expected_x).reshape(-1, DIM)
    assert torch.equal(x_new, expected_x)
    assert cosine(q.float() * scale[:, None], expected) >= 0.9999


def test_per_token_modulation_and_unknown_arguments_fall_back():
    g = torch.Generator().manual_seed(4)
    fused, plain = _block_pair("t2v_cross_attn", 5)
    x, e, freqs, ctx = _inputs(g, per_token=True)
    with torch.no_grad():
        a = fused(x.clone(), e=e, freqs=freqs, context=ctx)
        b = plain(x.clone(), e=e, freqs=freqs, context=ctx)
    assert torch.equal(a, b) and fused._headroom_fused_calls == 0
    assert sum(fused._headroom_fallbacks.values()) == 1
    assert next(iter(fused._headroom_fallbacks)).startswith("Wan block modulation of shape")
    with torch.no_grad(), pytest.raises(TypeError):  # ComfyUI's own forward rejects what it does not know
        fused(x.clone(), e=e[:, :1], freqs=freqs, context=ctx, some_new_option=1)
    assert fused._headroom_fallbacks["unknown arguments ['some_new_option']"] == 1
