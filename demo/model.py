"""The demo's own diffusion transformer: a small DiT of the shape family our users run.

patchify -> ``depth`` transformer blocks (self-attention with q/k RMS-norm + GELU MLP, both gated and
modulated by adaLN from the timestep) -> final adaLN layer -> unpatchify. Module names follow the
conventions our skip patterns know: ``patch_embed``, ``time_embed`` and ``final_layer`` stay float, the
block Linears (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``modulation``) are what INT8 is for.

Weights are random but deterministic: every tensor is drawn from its own generator seeded from
``(seed, tensor name)``, so the same seed gives the same checkpoint on any machine and in any order.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from .config import SIZES, DemoConfig, param_shapes  # noqa: F401  (SIZES: callers import it from here too)


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic float32 init for one tensor: scaled so activations stay O(1) through the blocks."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = shape[1]
    gain = 1.0
    if "modulation" in name:
        gain = 0.5  # shift/scale/gate of moderate size: every block contributes, none dominates
    elif name.startswith("final_layer.linear"):
        gain = 0.5
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))


def make_state_dict(cfg: DemoConfig, seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors. Drawn in a few threads (torch releases the GIL; each tensor has its own
    generator, so the result does not depend on the thread count); peak = result + a few float32 tensors."""
    shapes = param_shapes(cfg)

    def draw(item):
        name, shape = item
        return name, init_tensor(name, shape, seed).to(dtype)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(draw, shapes.items()))


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` in [0, 1] (scaled to 0..1000 as diffusion models do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_features(side: int, dim: int, device) -> torch.Tensor:
    """Fixed 2-D sin/cos positions ``[side*side, dim]`` (half the channels per axis)."""
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    coords = torch.arange(side, dtype=torch.float32, device=device)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        args = axis[:, None] * freqs[None]
        parts += [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        out = self.attend(self.qkv(x).view(b, n, 3 * h))
        return self.proj(out.transpose(1, 2).reshape(b, n, h))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv [B, N, 3H]`` -> attention output ``[B, heads, N, head_dim]`` (q/k RMS-normed)."""
        b, n, h3 = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads, h3 // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, ratio * hidden)
        self.fc2 = nn.Linear(ratio * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero style block: the timestep embedding gives shift/scale/gate for attention and MLP."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.modulation = nn.Linear(cfg.hidden, 6 * cfg.hidden)
        self.norm1 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg.hidden, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(cfg.hidden, cfg.mlp_ratio)
        self.int8_producers = False  # see forward_int8_producers; DemoDiT.use_int8_producers switches it
        # Eager calls that took forward_int8_producers (the demo's report reads it). Not counted under
        # torch.compile: dynamo would guard on the count and recompile the block on every call.
        self.producer_forwards = 0

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mods = self.modulation(F.silu(c)).chunk(6, dim=-1)
        if self.int8_producers and self._producers_apply(x):
            if not torch.compiler.is_compiling():
                self.producer_forwards += 1
            return self.forward_int8_producers(x, *mods)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def _producers_apply(self, x: torch.Tensor) -> bool:
        from ..quant.linear import takes_int8_input

        layers = (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2)
        return all(takes_int8_input(layer, x) for layer in layers)

    def forward_int8_producers(self, x, shift1, scale1, gate1, shift2, scale2, gate2) -> torch.Tensor:
        """:meth:`forward` for INT8 (W8A8) layers, line for line, with every Linear input written in INT8 by the
        op that makes it (:mod:`comfyui_headroom.kernels.producers`): norm + modulation, the attention output,
        GELU. Attention itself is the same code as in :meth:`forward`. Under ``torch.compile`` it traces whole: the
        producers and the GEMMs on their INT8 rows are ``headroom::*`` custom ops (kernels/ops.py)."""
        from ..kernels.producers import gelu_quantize, norm_modulate_quantize, quantize_heads

        b, n, h = x.shape
        dtype = x.dtype
        rows, _ = norm_modulate_quantize(x, shift1, scale1, self.norm1.eps)
        out = self.attn.attend(self.attn.qkv.forward_int8(rows, dtype).view(b, n, 3 * h))
        attn = self.attn.proj.forward_int8(quantize_heads(out), dtype).view(b, n, h)
        rows, x = norm_modulate_quantize(x, shift2, scale2, self.norm2.eps, y=attn, gate=gate1)
        hidden = self.mlp.fc1.forward_int8(rows, dtype)
        mlp = self.mlp.fc2.forward_int8(gelu_quantize(hidden), dtype).view(b, n, h)
        return torch.addcmul(x, gate2[:, None], mlp)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.linear = nn.Linear(cfg.hidden, cfg.patch * cfg.patch * cfg.latent_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DemoDiT(nn.Module):
    """Predicts the flow-matching velocity for a latent ``[B, C, H, W]`` at time ``t`` ``[B]``."""

    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.latent_channels * cfg.patch * cfg.patch, cfg.hidden)
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.time_freq, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden)
        )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def use_int8_producers(self, enabled: bool = True) -> int:
        """Blocks whose INT8 layers get their input from fused producers (:meth:`DiTBlock.forward_int8_producers`)
        wherever a W8A8 kernel runs; other calls (CPU, LoRA, small M) keep the plain forward. -> blocks switched."""
        for block in self.blocks:
            block.int8_producers = enabled
        return len(self.blocks)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = latent.shape
        p = self.cfg.patch
        x = latent.view(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hgt // p) * (wid // p), c * p * p)

    def unpatchify(self, x: torch.Tensor, hgt: int, wid: int) -> torch.Tensor:
        b, p, c = x.shape[0], self.cfg.patch, self.cfg.latent_channels
        x = x.view(b, hgt // p, wid // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, hgt, wid)

    def forward(self, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, _, hgt, wid = latent.shape
        if hgt != wid or hgt % self.cfg.patch:
            raise ValueError(f"latent must be square and divisible by patch {self.cfg.patch}, got {hgt}x{wid}")
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(self.patchify(latent).to(dtype))
        x = x + position_features(hgt // self.cfg.patch, self.cfg.hidden, x.device).to(dtype)
        c = self.time_embed(timestep_features(t, self.cfg.time_freq).to(dtype))
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c), hgt, wid)


def build_empty(cfg: DemoConfig) -> DemoDiT:
    """The module tree without storage (meta device): weights come from a file via ``load_state_dict(assign=True)``."""
    with torch.device("meta"):
        return DemoDiT(cfg)
