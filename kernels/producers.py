"""Producers: the ops that make a W8A8 layer's input write it in INT8 directly.

Why: a W8A8 layer quantizes its input in a pass of its own (read bf16, write int8 + row scales), right after
the op that made that input wrote it in bf16. In a DiT block every Linear input comes from such an op:
LayerNorm + adaLN modulation (``qkv``, ``fc1``), the attention output and its ``transpose.reshape`` copy
(``proj``), GELU (``fc2``); in eager torch each of those is itself two to four elementwise passes. On the H100
(demo ``1b``, 4096 tokens; docs/PERFORMANCE.md "## End to end") these passes plus the quantizations took
about a third of an INT8 block's GPU time. A producer does the op and the quantization in one pass and hands
the layer ``(q, scale)``; the layer then runs only its GEMM (``Int8Linear.forward_int8`` in quant/, which also
says whether a layer can take a producer's output for a call: ``takes_int8_input``).

* :func:`norm_modulate_quantize` - (optional gated residual) + LayerNorm + ``* (1 + scale) + shift`` + INT8;
* :func:`quantize_heads`         - the attention output ``[B, H, N, D]`` as ``[B*N, H*D]`` rows, in INT8;
* :func:`gelu_quantize`          - GELU (tanh or exact) + INT8;
* :func:`silu_mul_quantize`      - ``silu(gate) * up`` + INT8 (SwiGLU MLPs: Flux 2, Z-Image);
* :func:`rms_norm_scale_quantize` - RMSNorm (optional weight) + ``* (1 + scale)`` + INT8 (Z-Image / Lumina 2);
* :func:`rms_norm_residual_scale_quantize` - Lumina 2 / Z-Image's seam between half-blocks: the layer output's
  RMSNorm, ``tanh`` gate and residual add, then the above;
* :func:`heads_activation_quantize` - ``[attention heads | GELU or SiLU gate of the MLP]`` as one INT8 row (a
  parallel block's output projection, Flux's ``linear2``);

Each runs a Triton kernel on CUDA (and under ``TRITON_INTERPRET=1``), and the same math in torch elsewhere.
Under ``torch.compile`` each is a ``torch.ops.headroom.*`` custom op (:mod:`.ops`, with a fake implementation;
registered when the kernels' dispatcher loads, as for any ``Int8Linear``), so compiled graphs keep the producers as
single calls; eager calls skip the dispatcher and run the ``*_eager`` bodies directly.
A producer computes in float32 from its bf16 inputs and rounds once, where the eager chain rounds to bf16
after every op: the INT8 values can differ from "eager op, then quantize" by one step where a value sits
near a rounding edge (tests bound it against a float64 reference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backends import _rows
from .int8 import quantize_activation
from .support import HAS_TRITON, KernelUnsupported, interpreting


class Int8Rows(NamedTuple):
    """An activation in W8A8 form: ``q int8 [M, K]`` and its per-row ``scale float32 [M]``."""

    q: torch.Tensor
    scale: torch.Tensor


def _triton_here(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or interpreting())


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """``t [..., K]`` as ``[M, K]`` rows with unit stride in K (a view where one exists)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                           y: torch.Tensor | None = None, gate: torch.Tensor | None = None
                           ) -> tuple[Int8Rows, torch.Tensor | None]:
    """INT8 rows of ``layer_norm(x') * (1 + scale) + shift`` with ``x' = x + gate * y`` (or ``x`` without ``y``).

    ``x``, ``y``: ``[B, N, K]``; ``shift``, ``scale``, ``gate``: ``[B, K]`` (one per image, as a DiT's timestep
    modulation; views such as ``chunk`` outputs are fine). Returns ``(Int8Rows [B*N, K], x')``, ``x'`` in
    ``x.dtype`` (None without ``y``): the residual stream the rest of the block continues with.
    """
    b, _, k = x.shape
    residual = y is not None
    if residual and (gate is None or y.shape != x.shape):
        raise ValueError(f"norm_modulate_quantize: y {tuple(y.shape)} must match x {tuple(x.shape)} and come "
                         "with a gate")
    for name, t in (("shift", shift), ("scale", scale), ("gate", gate)):
        if t is not None and (t.shape != (b, k) or t.stride(-1) != 1):
            raise ValueError(f"norm_modulate_quantize: {name} must be [{b}, {k}] with contiguous rows, "
                             f"got {tuple(t.shape)} strides {t.stride()}")
    if torch.compiler.is_compiling():
        if residual:
            q, s, x_new = torch.ops.headroom.norm_modulate_quantize_residual(x, shift, scale, eps, y, gate)
            return Int8Rows(q, s), x_new
        return Int8Rows(*torch.ops.headroom.norm_modulate_quantize(x, shift, scale, eps)), None
    return norm_modulate_quantize_eager(x, shift, scale, eps, y if residual else None, gate if residual else None)


def norm_modulate_quantize_eager(x, shift, scale, eps, y=None, gate=None) -> tuple[Int8Rows, torch.Tensor | None]:
    """:func:`norm_modulate_quantize` on checked arguments, without the compile routing (the custom op runs it)."""
    b, n, k = x.shape
    residual = y is not None
    if _triton_here(x) and shift.stride(0) == scale.stride(0) and (not residual or gate.stride(0) == shift.stride(0)):
        from . import triton_producers

        try:
            q, s, x_new = triton_producers.norm_modulate_quantize(
                _rows(x), shift, scale, n, eps, _rows(y) if residual else None, gate)
            return Int8Rows(q, s), x_new.view(b, n, k) if residual else None
        except KernelUnsupported:
            pass  # rows too long for one pass: the torch path below
    x_new = (x.float() + gate.float()[:, None] * y.float()).to(x.dtype) if residual else None
    h = F.layer_norm((x_new if residual else x).float(), (k,), eps=eps)
    h = h * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return Int8Rows(*quantize_activation(h.reshape(b * n, k))), x_new


def quantize_heads(o: torch.Tensor) -> Int8Rows:
    """INT8 rows of ``o.transpose(1, 2).reshape(B * N, H * D)`` for an attention output ``o [B, H, N, D]``."""
    if torch.compiler.is_compiling():
        return Int8Rows(*torch.ops.headroom.quantize_heads(o))
    return quantize_heads_eager(o)


def quantize_heads_eager(o: torch.Tensor) -> Int8Rows:
    b, h, n, d = o.shape
    if _triton_here(o) and o.stride(-1) == 1:
        from . import triton_producers

        try:
            return Int8Rows(*triton_producers.quantize_heads(o))
        except KernelUnsupported:
            pass
    return Int8Rows(*quantize_activation(o.transpose(1, 2).reshape(b * n, h * d)))


def gelu_quantize(x: torch.Tensor, approximate: str = "tanh") -> Int8Rows:
    """INT8 rows of ``F.gelu(x, approximate=approximate)`` for ``x [..., K]``, flattened to ``[M, K]``: ``"tanh"``
    (Flux, Wan) or ``"none"``, the exact erf form (Kandinsky 5)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"gelu_quantize: approximate={approximate!r}; use 'tanh' or 'none', as F.gelu")
    if torch.compiler.is_compiling():
        return Int8Rows(*torch.ops.headroom.gelu_quantize(x, approximate))
    return gelu_quantize_eager(x, approximate)


def gelu_quantize_eager(x: torch.Tensor, approximate: str = "tanh") -> Int8Rows:
    x2 = _rows(x)
    if _triton_here(x2):
        from .triton_quant import quantize_rows

        return Int8Rows(*quantize_rows(x2, gelu=approximate))
    return Int8Rows(*quantize_activation(F.gelu(x2.float(), approximate=approximate)))


def silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor) -> Int8Rows:
    """INT8 rows of ``F.silu(gate) * up`` for ``gate``, ``up`` ``[..., I]`` of one shape (views such as the two
    halves of one tensor are fine), flattened to ``[M, I]``: the SwiGLU MLP's down-projection input."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul_quantize: gate {tuple(gate.shape)} and up {tuple(up.shape)} must match")
    if torch.compiler.is_compiling():
        return Int8Rows(*torch.ops.headroom.silu_mul_quantize(gate, up))
    return silu_mul_quantize_eager(gate, up)


def silu_mul_quantize_eager(gate: torch.Tensor, up: torch.Tensor) -> Int8Rows:
    g, u = _row_view(gate), _row_view(up)
    if _triton_here(g):
        from . import triton_producers

        try:
            return Int8Rows(*triton_producers.silu_mul_quantize(g, u))
        except KernelUnsupported:
            pass  # rows too long for one pass: the torch path below
    return Int8Rows(*quantize_activation(F.silu(g.float()) * u.float()))


def rms_norm_scale_quantize(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor,
                            eps: float = 1e-6) -> Int8Rows:
    """INT8 rows of ``rms_norm(x, weight) * (1 + scale)`` for ``x [B, N, K]``, ``weight [K]`` (or None) and
    ``scale [B, K]`` (one per image): Lumina 2 / Z-Image's ``modulate(attention_norm1(x), scale)``."""
    b, _, k = x.shape
    if scale.shape != (b, k) or (weight is not None and weight.shape != (k,)):
        raise ValueError(f"rms_norm_scale_quantize: scale must be [{b}, {k}] and weight [{k}], got "
                         f"{tuple(scale.shape)} and {None if weight is None else tuple(weight.shape)}")
    if torch.compiler.is_compiling():
        return Int8Rows(*torch.ops.headroom.rms_norm_scale_quantize(x, weight, scale, eps))
    return rms_norm_scale_quantize_eager(x, weight, scale, eps)


def rms_norm_scale_quantize_eager(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor,
                                  eps: float) -> Int8Rows:
    b, n, k = x.shape
    if _triton_here(x):
        from . import triton_producers

        try:
            return Int8Rows(*triton_producers.rms_norm_scale_quantize(
                _rows(x), None if weight is None else weight.contiguous(), _row_view(scale), n, eps))
        except KernelUnsupported:
            pass  # rows too long for one pass: the torch path below
    h = F.rms_norm(x.float(), (k,), None if weight is None else weight.float(), eps)
    h = h * (1 + scale.float()[:, None])
    return Int8Rows(*quantize_activation(h.reshape(b * n, k)))


def rms_norm_residual_scale_quantize(x: torch.Tensor, y: torch.Tensor, y_weight: torch.Tensor | None,
                                     gate: torch.Tensor | None, weight: torch.Tensor | None, scale: torch.Tensor,
                                     eps_y: float = 1e-6, eps: float = 1e-6) -> tuple[Int8Rows, torch.Tensor]:
    """``x' = x + tanh(gate) * rms_norm(y, y_weight)`` (``gate`` None: ``x + rms_norm(y, y_weight)``), each step in
    ``x.dtype`` as torch's ops round it, then the INT8 rows of ``rms_norm(x', weight) * (1 + scale)``: the end of one
    Lumina 2 / Z-Image half-block and the input of the next in one pass. ``x``, ``y`` ``[B, N, K]``; ``gate``,
    ``scale`` ``[B, K]``; weights ``[K]`` or None. Returns ``(Int8Rows [B*N, K], x')``."""
    b, _, k = x.shape
    if y.shape != x.shape:
        raise ValueError(f"rms_norm_residual_scale_quantize: y {tuple(y.shape)} must match x {tuple(x.shape)}")
    for name, t, shape in (("gate", gate, (b, k)), ("scale", scale, (b, k)), ("y_weight", y_weight, (k,)),
                           ("weight", weight, (k,))):
        if t is not None and (t.shape != shape or t.stride(-1) != 1):
            raise ValueError(f"rms_norm_residual_scale_quantize: {name} must be {list(shape)} with unit stride in "
                             f"its last dimension, got {tuple(t.shape)} strides {t.stride()}")
    if torch.compiler.is_compiling():
        q, s, x_new = torch.ops.headroom.rms_norm_residual_scale_quantize(x, y, y_weight, gate, weight, scale,
                                                                          eps_y, eps)
        return Int8Rows(q, s), x_new
    return rms_norm_residual_scale_quantize_eager(x, y, y_weight, gate, weight, scale, eps_y, eps)


def rms_norm_residual_scale_quantize_eager(x, y, y_weight, gate, weight, scale, eps_y: float,
                                           eps: float) -> tuple[Int8Rows, torch.Tensor]:
    b, n, k = x.shape
    if _triton_here(x):
        from . import triton_producers

        try:
            q, s, x_new = triton_producers.rms_norm_residual_scale_quantize(
                _rows(x), _rows(y), None if y_weight is None else y_weight.contiguous(), gate,
                None if weight is None else weight.contiguous(), scale, n, eps_y, eps)
            return Int8Rows(q, s), x_new.view(b, n, k)
        except KernelUnsupported:
            pass  # rows too long for one pass: the torch path below
    t = F.rms_norm(y, (k,), y_weight, eps_y)
    x_new = x + (t if gate is None else gate.tanh()[:, None] * t)
    return rms_norm_scale_quantize_eager(x_new, weight, scale, eps), x_new


def heads_activation_quantize(o: torch.Tensor, mlp: torch.Tensor, silu_gate: bool = False) -> Int8Rows:
    """INT8 rows of ``cat(o.transpose(1, 2).reshape(B*N, H*D), act(mlp))`` for an attention output ``o [B, H, N, D]``
    and the MLP's pre-activation ``mlp [B, N, F]`` (``act`` = tanh GELU) or ``[B, N, 2F]`` with ``silu_gate``
    (``silu(first half) * second half``): the input of a parallel block's joint output layer, without the transpose,
    activation and concatenation copies."""
    b, h, n, d = o.shape
    if mlp.shape[:-1] != (b, n) or (silu_gate and mlp.shape[-1] % 2):
        raise ValueError(f"heads_activation_quantize: mlp {tuple(mlp.shape)} must be [{b}, {n}, F]"
                         + (" with F even (SiLU gate halves)" if silu_gate else ""))
    if torch.compiler.is_compiling():
        return Int8Rows(*torch.ops.headroom.heads_activation_quantize(o, mlp, silu_gate))
    return heads_activation_quantize_eager(o, mlp, silu_gate)


def heads_activation_quantize_eager(o: torch.Tensor, mlp: torch.Tensor, silu_gate: bool = False) -> Int8Rows:
    b, h, n, d = o.shape
    rows = _row_view(mlp)
    if _triton_here(o) and o.stride(-1) == 1:
        from . import triton_producers

        return Int8Rows(*triton_producers.heads_activation_quantize(o, rows, silu_gate))
    m = rows.float()
    if silu_gate:
        gate, up = m.chunk(2, dim=-1)
        act = F.silu(gate) * up
    else:
        act = F.gelu(m, approximate="tanh")
    heads = o.transpose(1, 2).reshape(b * n, h * d).float()
    return Int8Rows(*quantize_activation(torch.cat((heads, act), dim=-1)))
