"""Fused INT8 flux blocks in the two other families that build them, through ComfyUI's model detection, on the CPU:
Flux 2 (global modulation, SiLU-gated MLP, 512-token padded text) and HunyuanImage 2.1 (ComfyUI's HunyuanVideo
model with 2-D patches, its token refiner in front of the blocks).

ComfyUI's detection takes the widths from the file (heads = hidden / 128), so a 256-wide model gives two heads of
128, as in the releases; the blocks' fused forwards (``fuse_blocks="on"``: torch producers and the reference GEMM)
and ComfyUI's own block code on the same INT8 layers are sampled with KSampler and compared.
"""

import pytest
import torch
from fused_util import count_one_pass_calls, load, random_state, sample_fused_and_unfused, stats
from safetensors.torch import save_file

TEXT_WIDTH = 64


def _flux2():
    import comfy.ldm.flux.model
    import comfy.ops

    return comfy.ldm.flux.model.Flux(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=TEXT_WIDTH,
        hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[32, 32, 32, 32],
        theta=2000, qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        txt_ids_dims=[3], patch_size=1, operations=comfy.ops.manual_cast, dtype=torch.bfloat16)


def _hunyuan_image_21():
    import comfy.ldm.hunyuan_video.model
    import comfy.ops

    return comfy.ldm.hunyuan_video.model.HunyuanVideo(
        image_model="hunyuan_video", in_channels=64, out_channels=64, vec_in_dim=None, context_in_dim=TEXT_WIDTH,
        hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[64, 64], theta=256,
        patch_size=[1, 1], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False,
        operations=comfy.ops.manual_cast, dtype=torch.bfloat16)


FAMILIES = {  # name -> (ComfyUI model class, model_base class detection must pick, latent channels)
    "flux2": (_flux2, "Flux2", 128),
    "hunyuan_image_21": (_hunyuan_image_21, "HunyuanImage21", 64),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, workdir):
    build, base_class, channels = FAMILIES[request.param]
    path = workdir / f"{request.param}_fused.safetensors"
    save_file(random_state(build(), seed=len(request.param)), str(path))
    models = {mode: load(str(path), mode, min_features=64) for mode in ("on", "off")}
    return request.param, models, base_class, channels


def test_detection_builds_the_family_with_fusable_blocks(family):
    import comfy.ldm.flux.layers as layers

    name, models, base_class, _ = family
    for patcher in models.values():
        assert type(patcher.model).__name__ == base_class, name
        blocks = [m for m in patcher.model.diffusion_model.modules()
                  if isinstance(m, (layers.DoubleStreamBlock, layers.SingleStreamBlock))]
        assert len(blocks) == 3
    assert stats(models["on"])["blocks"] == 3


def test_fused_blocks_sample_like_comfyuis_block_code(family, monkeypatch):
    name, models, _, channels = family
    calls = count_one_pass_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 12, TEXT_WIDTH, generator=g), {}]]  # noqa: E731
    latent = torch.randn(1, channels, 8, 8, generator=g)
    sample_fused_and_unfused(models, latent, cond(), cond(), blocks=3)
    assert calls  # the q/k norms, RoPE and the joint sequence in one pass per stream
