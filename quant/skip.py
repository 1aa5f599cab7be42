"""Which layers stay in full precision.

Substring patterns are matched on a module's full dotted name. They are deliberately plain substrings
(users know them from seed 000), so a pattern such as ``mlp.gate`` would also catch
``mlp.gate_and_up_proj``: model families that need an exact match add a pattern ending in ``$``, which
here means "the name ends with this" (e.g. ``mlp.gate$`` keeps the MoE router but not the experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

# Seed 000's list: VAE, vision tower, embeddings, timestep/patch embedders, final layers.
DEFAULT_SKIP_PATTERNS: tuple[str, ...] = (
    "vae",
    "autoencoder",
    "vision_model",
    "vision_aligner",
    "timestep_emb",
    "patch_embed",
    "time_embed",
    "time_embed_2",
    "final_layer",
    "wte",
    "ln_f",
    "lm_head",
)

# Optional: attention projections, for users who want attention in full precision.
ATTENTION_SKIP_PATTERNS: tuple[str, ...] = (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "qkv_proj",
    "out_proj",
    "self_attn",
    "cross_attn",
)

DEFAULT_MIN_FEATURES = 1024


def pattern_matches(pattern: str, name: str) -> bool:
    """Substring match; a trailing ``$`` anchors the pattern at the end of the name."""
    if pattern.endswith("$"):
        return name.endswith(pattern[:-1])
    return pattern in name


def matching_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that names ``name``, or None."""
    for pattern in patterns:
        if pattern and pattern_matches(pattern, name):
            return pattern
    return None


def resolve_patterns(skip: Sequence[str] | str | None = None, keep_default_skips: bool = True) -> list[str]:
    """Defaults (unless turned off) + the caller's patterns, deduplicated, order kept.

    ``skip`` may be a list or a comma/newline separated string (how a ComfyUI text widget sends it). Empty
    patterns are dropped, and so is a lone ``$`` (an empty name end: it would keep every layer in float).
    """
    if isinstance(skip, str):
        skip = [p.strip() for p in skip.replace("\n", ",").split(",")]
    elif skip is not None and not isinstance(skip, (list, tuple, set, frozenset)):
        raise ValueError(f"skip patterns: expected a list of strings or one comma-separated string, got "
                         f"{type(skip).__name__} {skip!r}")
    patterns = list(DEFAULT_SKIP_PATTERNS) if keep_default_skips else []
    for pattern in skip or ():
        if not isinstance(pattern, str):
            raise ValueError(f"skip patterns must be strings (parts of layer names), got {pattern!r} in {skip!r}")
        pattern = pattern.strip()
        if pattern and pattern != "$" and pattern not in patterns:
            patterns.append(pattern)
    return patterns


@dataclass(frozen=True)
class SkipDecision:
    skip: bool
    reason: str


def decide(
    name: str,
    in_features: int,
    out_features: int,
    patterns: Sequence[str],
    method: str = "rowwise",
    block_size: int = 128,
    min_features: int = DEFAULT_MIN_FEATURES,
) -> SkipDecision:
    """Should the Linear called ``name`` stay in full precision? Patterns first, then shape rules."""
    pattern = matching_pattern(name, patterns)
    if pattern is not None:
        return SkipDecision(True, f"pattern '{pattern}'")
    if in_features < min_features or out_features < min_features:
        return SkipDecision(True, f"shape {out_features}x{in_features} < {min_features}")
    if method == "block" and in_features % block_size != 0:
        return SkipDecision(True, f"in_features {in_features} not divisible by block size {block_size}")
    return SkipDecision(False, "quantized")
