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


def sample_fused_and_unfused(models: dict, latent, positive, negative, blocks: int, min_cosine: float = 0.999):
    """KSampler through the fused (``"on"``) and the unfused (``"off"``) model: every block call of ``on`` fused,
    none of ``off``; the outputs agree to ``min_cosine`` and differ (another code path: producers round once, in
    float32). -> ``(fused, plain)``."""
    fused, plain = (ksample(models[m], latent, positive, negative) for m in ("on", "off"))
    on, off = stats(models["on"]), stats(models["off"])
    assert on["blocks"] == off["blocks"] == blocks
    assert on["fused_calls"] > 0 and on["fallback_calls"] == 0, on
    assert off["fused_calls"] == 0 and off["fallbacks"] == {"fusing off": off["fallback_calls"]}, off
    assert cosine(fused, plain) >= min_cosine
    assert not torch.equal(fused, plain)
    return fused, plain


def sample_falling_back(models: dict, latent, positive, negative, prepare, reason: str) -> dict:
    """Each model, made ready by ``prepare(base) -> patcher`` (a patched clone, a LoRA), sampled with KSampler: no
    fused call while it runs, ``reason`` among the fused model's fallbacks, the same output both ways (both ran
    ComfyUI's forward) and another output than without ``prepare`` (it acted). -> outputs by mode."""
    outputs = {}
    for mode, base in models.items():
        before = stats(base)["fused_calls"]
        outputs[mode] = ksample(prepare(base), latent, positive, negative)
        assert stats(base)["fused_calls"] == before, mode
    assert stats(models["on"])["fallbacks"].get(reason, 0) > 0, stats(models["on"])
    assert torch.equal(outputs["on"], outputs["off"])
    assert not torch.equal(outputs["on"], ksample(models["off"], latent, positive, negative))
    return outputs


def with_transformer_option(key: str, value):
    """``prepare`` for :func:`sample_falling_back`: a clone with ``transformer_options[key] = value``."""
    def prepare(base):
        patched = base.clone()
        patched.model_options.setdefault("transformer_options", {})[key] = value
        return patched
    return prepare


def with_lora(lora: dict):
    """``prepare`` for :func:`sample_falling_back`: ComfyUI's LoRA loader path on the model."""
    import comfy.sd

    return lambda base: comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]


def count_one_pass_calls(monkeypatch) -> list:
    """A list that grows by one on each call of the fused blocks' q/k norm + RoPE pass (``pieces.qk_norm_rope``),
    which still runs: how a test sees that the pass, not ComfyUI's ops, computed the attention's inputs."""
    from comfyui_headroom.integrations.comfyui.fused import pieces

    calls = []
    one_pass = pieces.qk_norm_rope
    monkeypatch.setattr(pieces, "qk_norm_rope", lambda *a, **kw: calls.append(1) or one_pass(*a, **kw))
    return calls
