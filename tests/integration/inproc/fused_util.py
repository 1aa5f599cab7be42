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


def stats(patcher) -> dict:
    return fused_stats(patcher.model.diffusion_model)
