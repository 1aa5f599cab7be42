"""Fused INT8 flux blocks (integrations/comfyui/fused/flux.py) inside a real ComfyUI, on the CPU.

``fuse_blocks="on"`` runs the fused forwards with the torch producers and the reference GEMM, so the code path a GPU
takes (producer rows -> ``forward_int8``) is what runs here; ``off`` is ComfyUI's own block code on the same INT8
layers. Both are sampled with KSampler from one tiny Flux built through ComfyUI's model detection.
"""

import pytest
import torch
from comfyui_headroom.integrations.comfyui.fused import fuse_mode, install_fused_blocks
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig, make_int8_ops
from comfyui_models import flux_lora_state_dict, flux_state_dict
from fused_util import (
    cosine,
    count_one_pass_calls,
    ksample,
    load,
    sample_falling_back,
    sample_fused_and_unfused,
    stats,
    with_lora,
    with_transformer_option,
)
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def flux_file(workdir):
    path = workdir / "flux_fused.safetensors"
    save_file(flux_state_dict(depth=2, single=2), str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(flux_file):
    return {mode: load(flux_file, mode) for mode in ("on", "off")}


@pytest.fixture(scope="module")
def conditioning():
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 12, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    return torch.randn(1, 16, 8, 8, generator=g), cond(), cond()


def test_fused_flux_samples_like_comfyuis_block_code(models, conditioning):
    sample_fused_and_unfused(models, *conditioning, blocks=4)


def test_attention_patch_takes_comfyuis_forward(models, conditioning):
    seen = []

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.append(q.shape)
        return {"q": q * 1.5}

    def prepare(base):
        patched = base.clone()
        patched.set_model_attn1_patch(attn1_patch)
        return patched

    sample_falling_back(models, *conditioning, prepare, "transformer_options patch 'attn1_patch'")
    assert seen


def test_lora_still_applies_through_comfyuis_forward(models, flux_file, conditioning):
    from safetensors.torch import load_file

    lora = flux_lora_state_dict(load_file(flux_file), std=0.1)
    sample_falling_back(models, *conditioning, with_lora(lora), "LoRA side branch")


def _block_pair(cls_name: str, seed: int, **kwargs):
    """Two copies of one ComfyUI flux block with INT8 layers from the same float weights (min_features lowered so
    a 256-wide block quantizes): the first gets a fused forward."""
    import comfy.ldm.flux.layers as layers
    import comfy.ops

    torch.manual_seed(seed)
    ref = getattr(layers, cls_name)(256, 2, mlp_ratio=3.0, operations=comfy.ops.manual_cast, dtype=torch.bfloat16,
                                    **kwargs)
    state = {k: torch.randn_like(v) * 0.05 if v.ndim == 2 else (torch.ones_like(v) if "norm" in k else
                                                                torch.randn_like(v) * 0.01)
             for k, v in ref.state_dict().items()}
    blocks = []
    for _ in range(2):
        ops = make_int8_ops(Int8LoadConfig(min_features=64))
        block = getattr(layers, cls_name)(256, 2, mlp_ratio=3.0, operations=ops, dtype=torch.bfloat16, **kwargs)
        block.load_state_dict(state)
        blocks.append(block)
    assert install_fused_blocks(blocks[0], "on") == 1
    return blocks


def _mods(n: int, batch: int, g):
    from comfy.ldm.flux.layers import ModulationOut

    return [ModulationOut(*(0.3 * torch.randn(batch, 1, 3 * 256, generator=g, dtype=torch.bfloat16)).chunk(3, -1))
            for _ in range(n)]


def test_flux2_blocks_global_modulation_and_silu_gate():
    """Flux 2's configuration of the same classes, block by block (256 wide, two heads): no per-block modulation
    (the model hands the vectors in) and a SiLU-gated MLP. A whole Flux 2 through ComfyUI's detection:
    test_comfy_fused_flux2_hunyuan_image.py."""
    g = torch.Generator().manual_seed(3)
    fused, plain = _block_pair("DoubleStreamBlock", 1, modulation=False, mlp_silu_act=True)
    img, txt = (torch.randn(2, n, 256, generator=g, dtype=torch.bfloat16) for n in (24, 8))
    m = _mods(4, 2, g)
    vec = ((m[0], m[1]), (m[2], m[3]))
    pe = None
    with torch.no_grad():
        a = fused(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
        b = plain(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
    assert fused._headroom_fused_calls == 1
    for x, y in zip(a, b):
        assert cosine(x, y) >= 0.999
    single_fused, single_plain = _block_pair("SingleStreamBlock", 2, modulation=False, mlp_silu_act=True)
    x = torch.randn(2, 32, 256, generator=g, dtype=torch.bfloat16)
    vec = _mods(1, 2, g)[0]
    with torch.no_grad():
        a, b = single_fused(x.clone(), vec=vec, pe=None), single_plain(x.clone(), vec=vec, pe=None)
    assert single_fused._headroom_fused_calls == 1 and cosine(a, b) >= 0.999


def test_per_token_modulation_and_unknown_arguments_fall_back():
    g = torch.Generator().manual_seed(4)
    fused, plain = _block_pair("SingleStreamBlock", 5)
    x = torch.randn(1, 16, 256, generator=g, dtype=torch.bfloat16)
    vec = torch.randn(1, 256, generator=g, dtype=torch.bfloat16)
    dims = [(0, 8, 0), (8, 16, 0)]
    with torch.no_grad():
        a = fused(x.clone(), vec=vec, pe=None, modulation_dims=dims)
        b = plain(x.clone(), vec=vec, pe=None, modulation_dims=dims)
    assert torch.equal(a, b) and fused._headroom_fallbacks["modulation_dims"] == 1
    with torch.no_grad(), pytest.raises(TypeError):  # ComfyUI's own forward rejects what it does not know
        fused(x.clone(), vec=vec, pe=None, some_new_option=1)
    assert fused._headroom_fallbacks["unknown arguments ['some_new_option']"] == 1


def test_fuse_mode_choices_and_environment(monkeypatch):
    monkeypatch.delenv("HEADROOM_FUSE_BLOCKS", raising=False)
    assert fuse_mode("auto") == "auto" and fuse_mode("OFF") == "off"
    monkeypatch.setenv("HEADROOM_FUSE_BLOCKS", "on")
    assert fuse_mode("auto") == "on" and fuse_mode("off") == "off"  # the environment sets what auto means
    with pytest.raises(ValueError, match="fuse_blocks must be one of auto, on, off"):
        Int8LoadConfig(fuse_blocks="fast")
    monkeypatch.setenv("HEADROOM_FUSE_BLOCKS", "yes")
    with pytest.raises(ValueError, match="HEADROOM_FUSE_BLOCKS='yes'"):
        Int8LoadConfig()


def test_attention_override_still_chooses_the_attention(models, conditioning):
    """An ``optimized_attention_override`` (how nodes pick an attention kernel per model) runs inside the fused
    path too; one that drops ``skip_output_reshape`` and returns ``[B, N, H*D]`` still gives the right rows."""
    import comfy.ldm.modules.attention as attention

    latent, positive, negative = conditioning
    calls = []

    def override(func, q, k, v, heads, skip_output_reshape=False, **kwargs):
        calls.append(skip_output_reshape)
        return attention.attention_basic(q, k, v, heads, **kwargs)  # drops skip_output_reshape on purpose

    before = stats(models["on"])["fused_calls"]
    prepare = with_transformer_option("optimized_attention_override", override)
    outputs = {mode: ksample(prepare(base), latent, positive, negative) for mode, base in models.items()}
    assert stats(models["on"])["fused_calls"] > before
    assert True in calls and False in calls  # the fused path asked for heads, ComfyUI's forward did not
    assert cosine(outputs["on"], outputs["off"]) >= 0.999


def _joint_inputs(g, heads=2, d=128, n_txt=5, n_img=9):
    """A double block's two streams as its fused forward hands them on: q, k, v [B, N, H, D] views of each stream's
    qkv projection, with ComfyUI's QKNorm modules, and ComfyUI's RoPE of the joint sequence (EmbedND)."""
    import comfy.ldm.flux.layers as layers
    import comfy.ops

    streams = []
    for n in (n_txt, n_img):
        norm = layers.QKNorm(d, dtype=torch.bfloat16, operations=comfy.ops.manual_cast)
        with torch.no_grad():
            norm.query_norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
            norm.key_norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
        qkv = torch.randn(1, n, 3 * heads * d, generator=g).to(torch.bfloat16)
        streams.append((*qkv.view(1, n, 3, heads, d).unbind(2), norm))
    ids = torch.randint(0, 64, (1, n_txt + n_img, 3), generator=g).float()
    pe = layers.EmbedND(dim=d, theta=10000, axes_dim=[16, 56, 56])(ids)
    return streams, pe


@torch.no_grad()  # as ComfyUI samples (with autograd on, torch's rms_norm takes another implementation)
def test_attention_inputs_in_one_pass_equal_comfyuis_qknorm_cat_and_rope(monkeypatch):
    """The fused blocks' q/k norms + RoPE + joint sequence (kernels/attention_inputs.py, the torch path here) against
    ComfyUI's own QKNorm, torch.cat and apply_rope - the path the fused forward takes when another node pack
    replaced apply_rope."""
    import comfy.ldm.flux.math as flux_math
    from comfyui_headroom.integrations.comfyui.fused import flux

    g = torch.Generator().manual_seed(7)
    streams, pe = _joint_inputs(g)
    calls = count_one_pass_calls(monkeypatch)
    fused = flux._attention_inputs(flux_math, streams, pe)
    assert len(calls) == 2  # one pass per stream
    replaced = lambda q, k, pe: flux_math.apply_rope(q, k, pe)  # noqa: E731 - another pack's wrapper
    comfys = flux._attention_inputs(type("patched", (), {"apply_rope": staticmethod(replaced),
                                                         "__name__": flux_math.__name__}), streams, pe)
    assert len(calls) == 2  # the wrapper is not ComfyUI's apply_rope: ComfyUI's ops ran
    # ComfyUI's ops (apply_rope: comfy-kitchen's rope here) and its definition of the rotation (_apply_rope1, the
    # training path): equal but where a fused multiply-add rounds a value near zero otherwise
    normed = [norm(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) for q, k, v, norm in streams]
    definition = [flux_math._apply_rope1(torch.cat(parts, dim=2), pe) for parts in list(zip(*normed))[:2]]
    for got, want in zip(list(fused) + list(fused[:2]), list(comfys) + definition):
        assert got.shape == want.shape == (1, 2, 14, 128)
        assert (got == want).float().mean() > 0.999
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=1e-6)


@torch.no_grad()
def test_single_block_attention_inputs_and_fallback_for_a_norm_with_patches():
    import comfy.ldm.flux.math as flux_math
    from comfyui_headroom.integrations.comfyui.fused import flux

    g = torch.Generator().manual_seed(8)
    streams, pe = _joint_inputs(g, n_txt=0)
    one = [streams[1]]
    pe = pe[:, :, :9]
    fused = flux._attention_inputs(flux_math, one, pe)
    q, k, v, norm = one[0]
    norm.key_norm.weight_function = [lambda w: w * 2]  # a patch function: the module's own forward must run
    patched = flux._attention_inputs(flux_math, one, pe)
    expected_k = flux_math.apply_rope(*norm(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), pe)[1]
    assert torch.equal(patched[1], expected_k)
    assert not torch.allclose(patched[1].float(), fused[1].float(), atol=1e-2)
