"""Flow-matching sampling and a fixed latent -> RGB decoder: the demo's pipeline around the model.

Rectified flow: ``x_t = (1 - t) x_0 + t * noise`` and the model predicts the velocity ``noise - x_0``;
sampling integrates it with Euler steps from t = 1 (noise) to t = 0, on the time-shifted schedule
SD3/Flux use (``shift`` > 1 spends more steps at high noise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

DECODER_SEED = 20240607
DECODER_UPSCALE = 8  # like an image VAE: one latent pixel -> 8x8 image pixels


def shifted_timesteps(steps: int, shift: float = 3.0) -> torch.Tensor:
    """``steps + 1`` times from 1 down to 0: ``shift * t / (1 + (shift - 1) * t)`` on a uniform grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def initial_noise(channels: int, size: int, seed: int) -> torch.Tensor:
    """The fixed-seed starting latent ``[1, C, size, size]`` (float32, CPU: identical on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, size, size, generator=gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SampleResult:
    latent: torch.Tensor  # float32, CPU
    step_times_s: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    @property
    def step_time_s(self) -> float:
        """Median seconds per step (robust to one slow step)."""
        return float(np.median(self.step_times_s)) if self.step_times_s else 0.0


@torch.no_grad()
def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    device: torch.device | str,
    shift: float = 3.0,
    warmup: bool = True,
) -> SampleResult:
    """Euler integration of the model's velocity; times every step (after one untimed warm-up call).

    The warm-up call (same input as step 1) lets kernels compile/autotune and streams settle, so the
    step times are what a long run sees.
    """
    device = torch.device(device)
    x = noise.to(device=device, dtype=torch.float32)
    times = shifted_timesteps(steps, shift)
    result = SampleResult(latent=noise)
    if warmup:
        _sync(device)
        start = time.perf_counter()
        model(x, times[:1].to(device))
        _sync(device)
        result.warmup_s = time.perf_counter() - start
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        _sync(device)
        start = time.perf_counter()
        velocity = model(x, t.reshape(1).to(device)).float()
        x = x + (t_next - t) * velocity
        _sync(device)
        result.step_times_s.append(time.perf_counter() - start)
    result.latent = x.float().cpu()
    return result


def decode(latent: torch.Tensor, seed: int = DECODER_SEED) -> np.ndarray:
    """Latent ``[1, C, h, w]`` -> RGB ``uint8 [8h, 8w, 3]`` through a fixed random linear map.

    A stand-in for a VAE: each latent pixel is mixed to 3 colours by a seeded matrix, smoothly upsampled
    8x, and squashed into 0..255. Fixed, so INT8 and bf16 latents are compared through the same lens.
    """
    channels = latent.shape[1]
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(3, channels, generator=gen) / channels**0.5
    rgb = torch.einsum("oc,bchw->bohw", mix, latent.float().cpu())
    rgb = F.interpolate(rgb, scale_factor=DECODER_UPSCALE, mode="bilinear", align_corners=False)
    image = torch.sigmoid(1.5 * rgb)[0].permute(1, 2, 0)
    return (image * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def save_png(image: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def psnr_db(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio of two 8-bit images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)
