"""Tile configurations for the Triton kernels, chosen per GPU architecture.

Why per architecture: the best INT8 tile on Hopper (wgmma, TMA, 228 KB of shared memory) overflows the
shared memory of an Ada card, and Ampere prefers smaller K tiles. Each family gets a short candidate
list, best first; the first entry is used unless ``HEADROOM_AUTOTUNE=1`` asks to time the candidates
once per shape (see :mod:`.autotune`). Anything we do not know (sm75 and older, future chips) gets the
``fallback`` list: small tiles that fit every Triton-capable GPU.

Tests under ``TRITON_INTERPRET=1`` need tiny tiles: :func:`override` replaces every choice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class GemmConfig:
    """One tile shape for a matmul kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # persistent kernel with tensor descriptors (sm90+ only)

    def with_block_k(self, block_k: int) -> "GemmConfig":
        return replace(self, block_k=block_k)


@dataclass(frozen=True)
class QuantConfig:
    """Activation quantization: rows up to ``max_single_pass`` long are read exactly once."""

    max_single_pass: int = 16384
    loop_block: int = 4096
    num_warps: int = 8


G = GemmConfig

# W8A8: int8 x int8 -> int32. Hopper: the persistent TMA kernel measured best on our H100
# (docs/PERFORMANCE.md): 128x256x128, 3 stages, 8 warps; 128x128 when 128x256 tiles leave SMs idle.
W8A8_CONFIGS: dict[str, list[GemmConfig]] = {
    "sm90": [G(128, 256, 128, 8, 8, 3, tma=True), G(128, 128, 128, 8, 8, 4, tma=True)],
    "sm100": [G(128, 256, 128, 8, 8, 3, tma=True), G(128, 128, 128, 8, 8, 4, tma=True)],
    "sm120": [G(128, 128, 64, 8, 8, 3)],
    "sm80": [G(128, 128, 64, 8, 8, 4)],
    "sm86": [G(128, 128, 64, 8, 8, 3)],
    "sm89": [G(128, 128, 64, 8, 8, 3)],
    "fallback": [G(64, 64, 32, 8, 4, 2)],
}
# W8A8 through the warp-specialized Gluon kernel (kernels/gluon_w8a8.py), Hopper only. block_m is fixed at 128
# (two 64-row consumer warpgroups). Two tiles, measured on the H100 (bench/results/gluon_small_m.json, M 256-4096
# x 8 layer shapes): 128x256x128 with 4 stages is the fastest per multiply-add; 128x128x128 with 6 stages does
# ~10 % less per SM but has twice the tiles, so it wins where the big tile leaves a last wave half empty.
# ``pick_ws_config`` chooses by waves x work per tile. ``HEADROOM_GLUON=0`` keeps the Triton kernel.
W8A8_WS_CONFIGS: dict[str, list[GemmConfig]] = {"sm90": [G(128, 256, 128, 8, 4, 4), G(128, 128, 128, 8, 4, 6)]}
WS_SMALL_TILE_COST = 1.1  # time of a 128-wide tile relative to half a 256-wide one (H100, same run)
_GLUON_ENABLED = os.environ.get("HEADROOM_GLUON", "1") != "0"

# Block scales keep a float32 accumulator AND an int32 partial per K tile: twice the registers, so
# the 128x256 tile spills (ptxas, sm90). On the H100 it is faster all the same (bench/kernels.py tune,
# 2026-11-23: 4096x3072x3072 162 us vs 217 us for 128x128x128/4 stages); sm100, unmeasured, keeps the
# smaller second candidate.
BLOCK_SCALE_USES_SMALLER_TILE = ("sm100",)

# W8A16 (small M, memory bound): narrow N tiles and deep K tiles so that many programs stream the weight.
# The first entry serves M <= 16, the second (if any) larger M, where a 64-row A tile x 512 K would not
# fit in shared memory (measured on H100: 16x32x512 is 2.6x faster than 16x64x256 at M = 1, K = N = 3072).
W8A16_CONFIGS: dict[str, list[GemmConfig]] = {
    "sm90": [G(16, 32, 512, 1, 8, 3), G(16, 64, 256, 1, 8, 4)],
    "sm100": [G(16, 32, 512, 1, 8, 3), G(16, 64, 256, 1, 8, 4)],
    "sm120": [G(16, 64, 128, 1, 4, 3)],
    "sm80": [G(16, 64, 128, 1, 4, 4)],
    "sm86": [G(16, 64, 128, 1, 4, 3)],
    "sm89": [G(16, 64, 128, 1, 4, 3)],
    "fallback": [G(16, 32, 64, 1, 4, 2)],
}

# W8A16 at M = 1 (a GEMV, no MMA, so one config suits every GPU): block_n x block_k, warps, stages; block_m is
# unused. Chosen on the H100 from 17 candidates (4-64 rows x 256-2048 K, 2-8 warps): 4 x 1024, 4 warps, 3 stages
# was best or within 4 % of the best on all five shapes of bench/kernels.py (1.49-1.66x bf16 GPU time).
W8A16_GEMV_CONFIGS: dict[str, GemmConfig] = {"fallback": G(1, 4, 1024, 1, 4, 3)}

_override: dict[str, object] = {}


_capabilities: dict = {}


def capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability``, cached per device (it runs on every INT8 call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capabilities.get(index)
    if cap is None:
        cap = _capabilities[index] = torch.cuda.get_device_capability(index)
    return cap


def arch_of(device: torch.device) -> str:
    """``"sm90"``-style family name of a CUDA device; ``"cpu"`` elsewhere (the interpreter)."""
    if device.type != "cuda":
        return "cpu"
    major, minor = capability(device)
    if major == 9:
        return "sm90"
    if major == 10 or major == 11:
        return "sm100"
    if major == 12:
        return "sm120"
    if major == 8:
        return {0: "sm80", 6: "sm86", 7: "sm86", 9: "sm89"}.get(minor, "sm86")
    return "fallback"


def int8_mma_supported(device: torch.device) -> bool:
    """Triton's int8 ``tl.dot`` needs sm80+ (it crashes the compiler for sm75, checked with triton 3.9)."""
    return device.type != "cuda" or capability(device) >= (8, 0)


def w8a8_candidates(arch: str) -> list[GemmConfig]:
    if "w8a8" in _override:
        return [_override["w8a8"]]  # type: ignore[list-item]
    return W8A8_CONFIGS.get(arch, W8A8_CONFIGS["fallback"])


def w8a16_candidates(arch: str) -> list[GemmConfig]:
    if "w8a16" in _override:
        return [_override["w8a16"]]  # type: ignore[list-item]
    return W8A16_CONFIGS.get(arch, W8A16_CONFIGS["fallback"])


def ws_candidates(arch: str) -> list[GemmConfig]:
    """Tiles of the Gluon W8A8 kernel on this architecture; empty where it does not run (or is switched off)."""
    if "ws" in _override:
        return [_override["ws"]]  # type: ignore[list-item]
    return W8A8_WS_CONFIGS.get(arch, []) if _GLUON_ENABLED else []


def pick_ws_config(candidates: list[GemmConfig], m: int, n: int, num_sms: int) -> GemmConfig:
    """The candidate with the least estimated time: full waves of tiles (the last one counts whole) x work per
    tile, in units of a 128 x 128 tile; narrower tiles pay WS_SMALL_TILE_COST. Reproduces the winner of every
    shape measured (see W8A8_WS_CONFIGS)."""
    def cost(cfg: GemmConfig) -> float:
        waves = cdiv(cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), num_sms)
        return waves * (cfg.block_n / 128) * (1.0 if cfg.block_n >= 256 else WS_SMALL_TILE_COST)

    return min(candidates, key=cost)


def set_gluon(enabled: bool) -> None:
    """Switch the Gluon W8A8 kernel on or off (``HEADROOM_GLUON``; benchmarks compare both)."""
    global _GLUON_ENABLED
    _GLUON_ENABLED = enabled


def gemv_config(arch: str) -> GemmConfig:
    if "gemv" in _override:
        return _override["gemv"]  # type: ignore[return-value]
    return W8A16_GEMV_CONFIGS.get(arch, W8A16_GEMV_CONFIGS["fallback"])


_DEFAULT_QUANT = QuantConfig()


def quant_config() -> QuantConfig:
    return _override.get("quant", _DEFAULT_QUANT)  # type: ignore[return-value]


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` as a plain function: triton's is a constexpr function (~5 us per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` as a plain function (same reason as :func:`cdiv`)."""
    return max(n, 0) if n <= 1 else 1 << (n - 1).bit_length()


def tma_allowed(arch: str) -> bool:
    if "tma" in _override:
        return bool(_override["tma"])
    return arch in ("sm90", "sm100")


@contextlib.contextmanager
def override(
    w8a8: GemmConfig | None = None,
    w8a16: GemmConfig | None = None,
    quant: QuantConfig | None = None,
    tma: bool | None = None,
    gemv: GemmConfig | None = None,
    ws: GemmConfig | None = None,
):
    """Use these configs for every call inside the block (tiny tiles for the interpreter, tuning)."""
    saved = dict(_override)
    for key, value in (("w8a8", w8a8), ("w8a16", w8a16), ("quant", quant), ("tma", tma), ("gemv", gemv),
                       ("ws", ws)):
        if value is not None:
            _override[key] = value
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)
