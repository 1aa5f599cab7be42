"""Shared by the fused-block tests: one model loaded fused and unfused, sampled with ComfyUI's KSampler."""

import nodes
import torch
from comfyui_headroom.integrations.comfyui.fused import fused_stats
from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def load(path: str, fuse_blocks: str, **config):
    """The INT8 model at ``path`` with fused block forwards forced on (torch producers on the CPU) or off."""
    patcher, _ = load_int8_diffusion_model(path, Int8LoadConfig(fuse_blocks=fuse_blocks, **config))
    return patcher


def ksample(patcher, latent: torch.Tensor, positive, negative, steps: int = 2, cfg: float = 2.0, seed: int = 0):
    """ComfyUI's KSampler node function on ``latent`` (what a workflow runs); -> the sampled latent, float."""
    out, = nodes.common_ksampler(patcher, seed, steps, cfg, "euler", "simple", positive, negative,
                                 {"samples": latent}, denoise=1.0)
    return out["samples"].float()


def random_state(module: torch.nn.Module, seed: int) -> dict:
    """Seeded bf16 weights of a sensible scale for ``module``'s state dict: linear weights ~ 1/sqrt(fan_in), norm
    weights near one, small biases, other tensors (pad tokens) ~ 0.5."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, v in module.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if "norm" in key:
            r = 1 + 0.1 * r
        elif v.ndim == 2 and key.endswith(".weight"):
            r = r * v.shape[1] ** -0.5
        elif key.endswith("bias"):
            r = 0.01 * r
        else:
            r = 0.5 * r
        state[key] = r.to(torch.bfloat16).contiguous()
    return state


def stats(patcher) -> dict:
    return fused_stats(patcher.model.diffusion_model)
