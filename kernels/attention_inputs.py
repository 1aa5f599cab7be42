"""The attention's inputs in one pass: q/k RMSNorm, RoPE and the ``[B, H, N, D]`` head layout (the fused Flux,
Flux 2, HunyuanImage 2.1, Qwen-Image and Kandinsky 5 blocks).

Why: between a block's qkv projection and its attention, ComfyUI's blocks run torch ops that each read and write
every head once more: the q and k RMSNorms (on transposed views, so with a contiguous copy first), the
concatenation of the text and image streams into the joint sequence (q, k and v), and RoPE on q and k. At Flux's
width and 4096 image tokens that is about half a gigabyte of memory traffic and a dozen launches per double block,
next to INT8 GEMMs that take a few hundred microseconds. :func:`qk_norm_rope` does it in one pass per stream and
writes each stream's rows straight into its place in the joint buffers.

The numbers are ComfyUI's: the norm's output is rounded to the stream's dtype before the rotation, which runs in
float32 on ComfyUI's rotation matrices (``comfy.ldm.flux.math.apply_rope1``: ``pe [B, 1, N, D/2, 2, 2]``), and the
result is rounded once. The Triton kernel (:mod:`.triton_attention_inputs`) runs on CUDA and under
``TRITON_INTERPRET=1``; the same math in torch elsewhere and under ``torch.compile`` (whose compiler fuses these
element-wise ops itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .support import HAS_TRITON, KernelUnsupported, interpreting


def _check(q, k, v, q_weight, k_weight, pe, out, offset) -> tuple[int, int, int, int]:
    b, n, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or v.dtype != q.dtype or k.dtype != q.dtype:
        raise ValueError(f"qk_norm_rope: q, k, v must be [B, N, H, D] of one shape and dtype, got "
                         f"{tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if d % 2 or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"qk_norm_rope: the head size {d} must be even, with unit stride in q, k and v")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and w.shape != (d,):
            raise ValueError(f"qk_norm_rope: {name} must be [{d}], got {tuple(w.shape)}")
    if out is not None:
        total = out[0].shape[2]
        if any(t.shape != (b, h, total, d) or t.dtype != v.dtype or not t.is_contiguous() for t in out) \
                or not 0 <= offset <= total - n:
            raise ValueError(f"qk_norm_rope: out must be three contiguous [{b}, {h}, N_total, {d}] {v.dtype} "
                             f"buffers holding rows {offset}..{offset + n}")
    total = offset + n if out is None else out[0].shape[2]
    if pe is not None and not rope_fits(pe, b, total, d):
        raise ValueError(f"qk_norm_rope: pe {tuple(pe.shape)} {pe.dtype} is not float32 [{b} or 1, 1, >= {total}, "
                         f"{d // 2}, 2, 2]")
    return b, n, h, d


def rope_fits(pe: torch.Tensor, batch: int, tokens: int, head_dim: int) -> bool:
    """Whether ``pe`` is ComfyUI's rotation-matrix RoPE for ``tokens`` positions of ``head_dim`` (what
    :func:`qk_norm_rope` takes; a caller otherwise keeps ComfyUI's own ``apply_rope``)."""
    return (pe.dtype == torch.float32 and pe.ndim == 6 and pe.shape[0] in (1, batch) and pe.shape[1] == 1
            and pe.shape[2] >= tokens and tuple(pe.shape[3:]) == (head_dim // 2, 2, 2)
            and tuple(pe.stride()[3:]) == (4, 2, 1))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                 k_weight: torch.Tensor | None, eps_q: float, eps_k: float, pe: torch.Tensor | None,
                 out: tuple | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rope(rms_norm(q)), rope(rms_norm(k)), v)`` as ``[B, H, N, D]``.

    ``q, k, v``: ``[B, N, H, D]`` views of the projection output(s) (unit stride in D); ``q_weight``,
    ``k_weight``: the norms' ``[D]`` weights or None; ``pe``: ComfyUI's ``[B or 1, 1, N_total, D/2, 2, 2]`` float32
    rotation matrices or None. ``out``: three contiguous ``[B, H, N_total, D]`` buffers to write rows
    ``offset .. offset + N`` of (a stream's place in a joint sequence; ``pe`` is indexed by that row), returned;
    None: new ``[B, H, N, D]`` tensors."""
    b, n, h, d = _check(q, k, v, q_weight, k_weight, pe, out, offset)
    # the weights in the stream's dtype, as ComfyUI's norm casts them (a [D] vector: nothing to speak of)
    q_weight, k_weight = (None if w is None else w.to(q.dtype) for w in (q_weight, k_weight))
    if out is None:
        out = tuple(torch.empty((b, h, n, d), dtype=v.dtype, device=v.device) for _ in range(3))
    if HAS_TRITON and (q.is_cuda or interpreting()) and not torch.compiler.is_compiling():
        from . import triton_attention_inputs

        try:
            triton_attention_inputs.qk_norm_rope(q, k, v, q_weight, k_weight, eps_q, eps_k, pe, out, offset)
            return out
        except KernelUnsupported:
            pass  # a head size the kernel does not take: the torch path below
    rows = slice(offset, offset + n)
    freqs = None if pe is None else pe[:, 0, rows, None]  # [B or 1, N, 1, D/2, 2, 2]: broadcast over the heads
    out[0][:, :, rows] = _norm_rope(q, q_weight, eps_q, freqs).transpose(1, 2)
    out[1][:, :, rows] = _norm_rope(k, k_weight, eps_k, freqs).transpose(1, 2)
    out[2][:, :, rows] = v.transpose(1, 2)
    return out


def _norm_rope(x: torch.Tensor, weight, eps: float, freqs) -> torch.Tensor:
    """ComfyUI's sequence in torch: RMSNorm (its output in ``x.dtype``), then the rotation in float32."""
    x = F.rms_norm(x, (x.shape[-1],), weight, eps)
    if freqs is None:
        return x
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return rotated.reshape(x.shape).to(x.dtype)
