"""The demo model's shapes: its config, the size presets and every tensor's shape.

Plain Python (no torch), so that ``headroom --help`` and ``headroom demo --help`` list the sizes without importing
torch; :mod:`.model` builds the network from these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DemoConfig:
    """Shape of a demo model and of the latent it denoises."""

    hidden: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    latent_channels: int = 16
    patch: int = 2
    latent_size: int = 32  # latent height = width; tokens = (latent_size / patch) ** 2
    time_freq: int = 256

    @property
    def tokens(self) -> int:
        return (self.latent_size // self.patch) ** 2

    def with_tokens(self, tokens: int) -> "DemoConfig":
        """The same model on a square latent with ``tokens`` patches (a perfect square)."""
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"--tokens must be a perfect square (e.g. 1024, 4096), got {tokens}")
        fields = asdict(self)
        fields["latent_size"] = side * self.patch
        return DemoConfig(**fields)

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in param_shapes(self).values())


# Presets. Head dim 128 everywhere (as Flux, Qwen-Image, Wan). Token counts: tiny 64 (CPU), small 1024
# (a 512 px image), 1b 4096 (a 1024 px image, Flux's sequence length at 1 MP).
SIZES: dict[str, DemoConfig] = {
    "tiny": DemoConfig(hidden=1024, depth=2, heads=8, latent_size=16),
    "small": DemoConfig(hidden=1024, depth=12, heads=8, latent_size=64),
    "1b": DemoConfig(hidden=3072, depth=6, heads=24, latent_size=128),
}


def param_shapes(cfg: DemoConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, name -> shape (the model's state_dict, in order)."""
    h, p, c = cfg.hidden, cfg.patch, cfg.latent_channels
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.weight": (h, c * p * p),
        "patch_embed.bias": (h,),
        "time_embed.0.weight": (h, cfg.time_freq),
        "time_embed.0.bias": (h,),
        "time_embed.2.weight": (h, h),
        "time_embed.2.bias": (h,),
    }
    head_dim = h // cfg.heads
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "modulation.weight": (6 * h, h),
            b + "modulation.bias": (6 * h,),
            b + "attn.qkv.weight": (3 * h, h),
            b + "attn.qkv.bias": (3 * h,),
            b + "attn.q_norm.weight": (head_dim,),
            b + "attn.k_norm.weight": (head_dim,),
            b + "attn.proj.weight": (h, h),
            b + "attn.proj.bias": (h,),
            b + "mlp.fc1.weight": (cfg.mlp_ratio * h, h),
            b + "mlp.fc1.bias": (cfg.mlp_ratio * h,),
            b + "mlp.fc2.weight": (h, cfg.mlp_ratio * h),
            b + "mlp.fc2.bias": (h,),
        })
    shapes.update({
        "final_layer.modulation.weight": (2 * h, h),
        "final_layer.modulation.bias": (2 * h,),
        "final_layer.linear.weight": (p * p * c, h),
        "final_layer.linear.bias": (p * p * c,),
    })
    return shapes
