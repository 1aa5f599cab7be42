"""Fused forward of Lumina 2 / Z-Image's block (``comfy.ldm.lumina.model.JointTransformerBlock``), both kinds: the
modulated main layers and noise refiner, and the unmodulated context / SigLIP refiners.

It mirrors ComfyUI's ``JointTransformerBlock.forward`` with the ``JointAttention`` and ``FeedForward`` forwards
written out inside it; what changes is only where the INT8 layers' inputs come from:

* ``qkv``: RMSNorm ``attention_norm1`` (its weight) + ``* (1 + scale_msa)`` written as INT8 rows in one pass
  (:func:`~comfyui_headroom.kernels.producers.rms_norm_scale_quantize`; an unmodulated block passes a zero scale);
* ``out``: ComfyUI's attention output kept as ``[B, H, N, D]`` (``skip_output_reshape``) and quantized from there
  (``quantize_heads``), no transpose copy;
* ``w1`` and ``w3`` take the same input, written together with the attention half's end: ``attention_norm2`` of
  the attention output, its ``tanh`` gate and the residual add, then ``ffn_norm1`` + ``scale_mlp``, in one producer
  (``rms_norm_residual_scale_quantize``; float16, where ComfyUI clamps the output first, runs those in torch);
* ``w2``: ``silu(w1 x) * w3 x`` fused with its quantization (``silu_mul_quantize``); in float16 ComfyUI clamps that
  product to the float16 range before ``w2`` reads it, so there it is computed with torch ops (silu, mul,
  ``clamp_fp16``) and quantized with ``pieces.quantize_rows``.

Kept in torch, as ComfyUI computes them: the ``adaLN_modulation`` (its own layer forward), q/k RMSNorm + RoPE
(``comfy.quant_ops.ck.rms_rope`` with the norm weights cast by ``comfy.ops.cast_bias_weight``, or the modules and
``apply_rope`` where ComfyUI uses those), the GQA key/value repeat, and the block's last step, ``ffn_norm2`` (its
module) with the ``tanh`` gate and the residual add: no producer of this block reads its result. Attention is
``comfy.ldm.lumina.model.optimized_attention_masked`` (``optimized_attention`` as the module bound it:
``--use-sage-attention`` etc. keep working).

Falls back (ComfyUI's forward runs that call): ``timestep_zero_index`` (Z-Image omni: per-token modulation of two
batch halves, done in place by ComfyUI), an ``optimized_attention_override`` in ``transformer_options`` (an attention
replacement), ``patches_replace``, a replaced module-level attention function, a LoRA / weight patch on any of the
five fused layers, a fused layer left on another device by partial loading, a norm without eps, gradients, unknown
arguments. The input norms' weights go through ``cast_bias_weight`` as in ComfyUI's ``RMSNorm`` (so their weight
patches and offloading are honoured, not a reason to fall back).
"""

from __future__ import annotations

import torch

from ....kernels.producers import (
    quantize_heads,
    rms_norm_residual_scale_quantize,
    rms_norm_scale_quantize,
    silu_mul_quantize,
)
from .pieces import FallBack, layers_take_rows, no_extra_arguments, no_patches, per_image, quantize_rows


def _lumina_model():
    """``comfy.ldm.lumina.model``; FallBack when something replaced the attention function its blocks call."""
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.modules.attention as attention

    if lumina.optimized_attention_masked is not attention.optimized_attention_masked:
        raise FallBack("comfy.ldm.lumina.model.optimized_attention_masked replaced")
    return lumina


def _norm_rows(norm, x: torch.Tensor, scale: torch.Tensor):
    """INT8 rows of ``norm(x) * (1 + scale)`` for one of the block's input RMSNorms, its weight as ComfyUI's
    ``RMSNorm`` casts it (``cast_bias_weight``: device, dtype, weight patches)."""
    weight, release = _cast_norm_weight(norm, x)
    try:
        return rms_norm_scale_quantize(x, weight, scale, norm.eps)
    finally:
        release()


def _cast_norm_weight(norm, x):
    """``(weight, release)`` of an RMSNorm as ComfyUI's ``RMSNorm`` casts it for ``x`` (``cast_bias_weight``: device,
    dtype, weight patches); ``(None, no-op)`` for a norm without a weight."""
    import comfy.ops

    if norm.eps is None:
        raise FallBack("RMSNorm without eps")
    if norm.weight is None:
        return None, lambda: None
    weight, _, stream = comfy.ops.cast_bias_weight(norm, x, offloadable=True)
    return weight, lambda: comfy.ops.uncast_bias_weight(norm, weight, None, stream)


def _seam_rows(out_norm, out: torch.Tensor, gate, in_norm, x: torch.Tensor, scale: torch.Tensor):
    """``x + tanh(gate) * out_norm(out)`` (``gate`` None: ``x + out_norm(out)``) -> ``(INT8 rows of in_norm(x') *
    (1 + scale), x')``: the end of one half-block and the next one's input in one producer. In float16 ComfyUI clamps
    ``out`` first (``clamp_fp16``): there the torch ops and :func:`_norm_rows` run instead."""
    if x.dtype == torch.float16:
        t = out_norm(_clamp_fp16(out))
        x = x + (t if gate is None else gate.unsqueeze(1).tanh() * t)
        return _norm_rows(in_norm, x, scale), x
    y_weight, release_y = _cast_norm_weight(out_norm, out)
    try:
        weight, release = _cast_norm_weight(in_norm, x)
        try:
            return rms_norm_residual_scale_quantize(x, out, y_weight, gate, weight, scale, out_norm.eps, in_norm.eps)
        finally:
            release()
    finally:
        release_y()


def _qk_norm_rope(attn, xq, xk, freqs_cis):
    """q/k norm + RoPE exactly as ``JointAttention.forward`` does them (ComfyUI's functions)."""
    import comfy.model_management
    import comfy.ops
    import comfy.quant_ops

    if not (attn.qk_norm and not comfy.model_management.in_training):
        xq, xk = attn.q_norm(xq), attn.k_norm(xk)
        return _lumina_model().apply_rope(xq, xk, freqs_cis)
    q_scale, _, q_stream = comfy.ops.cast_bias_weight(attn.q_norm, xq, offloadable=True)
    k_scale, _, k_stream = comfy.ops.cast_bias_weight(attn.k_norm, xk, offloadable=True)
    eps = attn.q_norm.eps if attn.q_norm.eps is not None else torch.finfo(torch.float32).eps
    if attn.n_local_heads == attn.n_local_kv_heads:
        xq, xk = comfy.quant_ops.ck.rms_rope(xq, xk, freqs_cis, q_scale, k_scale, eps)
    else:
        xq = comfy.quant_ops.ck.rms_rope1(xq, freqs_cis, q_scale, eps)
        xk = comfy.quant_ops.ck.rms_rope1(xk, freqs_cis, k_scale, eps)
    comfy.ops.uncast_bias_weight(attn.q_norm, q_scale, None, q_stream)
    comfy.ops.uncast_bias_weight(attn.k_norm, k_scale, None, k_stream)
    return xq, xk


def _attention(attn, rows, shape, x_mask, freqs_cis, transformer_options, dtype) -> torch.Tensor:
    """``JointAttention.forward`` on ``qkv``'s INT8 input rows -> the ``out`` projection ``[B, N, dim]``."""
    lumina = _lumina_model()
    b, n, width = shape
    heads, kv_heads, head_dim = attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim
    xq, xk, xv = torch.split(attn.qkv.forward_int8(rows, dtype).view(b, n, -1),
                             [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    xq = xq.view(b, n, heads, head_dim)
    xk = xk.view(b, n, kv_heads, head_dim)
    xv = xv.view(b, n, kv_heads, head_dim)
    xq, xk = _qk_norm_rope(attn, xq, xk, freqs_cis)
    n_rep = heads // kv_heads
    if n_rep >= 1:
        xk = xk.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        xv = xv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
    out = lumina.optimized_attention_masked(xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), heads, x_mask,
                                            skip_reshape=True, skip_output_reshape=True,
                                            transformer_options=transformer_options)
    del xq, xk, xv
    return attn.out.forward_int8(quantize_heads(out), dtype).view(b, n, -1)


def _feed_forward(ff, rows, shape, dtype) -> torch.Tensor:
    """``FeedForward.forward`` on its INT8 input rows (shared by ``w1`` and ``w3``) -> ``[B, N, dim]``."""
    b, n, _ = shape
    up1, up3 = ff.w1.forward_int8(rows, dtype), ff.w3.forward_int8(rows, dtype)
    if dtype == torch.float16:  # ComfyUI clamps silu(w1 x) * w3 x to the float16 range before w2 reads it
        hidden = quantize_rows(_clamp_fp16(torch.nn.functional.silu(up1) * up3))
    else:
        hidden = silu_mul_quantize(up1, up3)
    del up1, up3
    return ff.w2.forward_int8(hidden, dtype).view(b, n, -1)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    from comfy.ldm.lumina.model import clamp_fp16

    return clamp_fp16(x)


def joint_transformer_block(block, mode, x, x_mask, freqs_cis, adaln_input=None, timestep_zero_index=None,
                            transformer_options={}, **kwargs):
    """``JointTransformerBlock.forward`` with producer-fed INT8 layers."""
    no_extra_arguments(kwargs)
    if timestep_zero_index is not None:
        raise FallBack("timestep_zero_index (per-token modulation)")
    if "optimized_attention_override" in transformer_options:
        raise FallBack("transformer_options optimized_attention_override")
    no_patches(transformer_options, ())
    attn, ff = block.attention, block.feed_forward
    layers_take_rows((attn.qkv, attn.out, ff.w1, ff.w3, ff.w2), x, mode)
    b, n, width = x.shape
    dtype = x.dtype

    if block.modulation:
        if adaln_input is None:
            raise FallBack("a modulated block without adaln_input")  # ComfyUI's forward asserts
        scale_msa, gate_msa, scale_mlp, gate_mlp = (per_image(t, b, width, "JointTransformerBlock")
                                                    for t in block.adaLN_modulation(adaln_input).chunk(4, dim=1))
        attn_out = _attention(attn, _norm_rows(block.attention_norm1, x, scale_msa), x.shape, x_mask, freqs_cis,
                              transformer_options, dtype)
        rows, x = _seam_rows(block.attention_norm2, attn_out, gate_msa, block.ffn_norm1, x, scale_mlp)
        del attn_out
        ff_out = _feed_forward(ff, rows, x.shape, dtype)
        return x + gate_mlp.unsqueeze(1).tanh() * block.ffn_norm2(_clamp_fp16(ff_out))

    if adaln_input is not None:
        raise FallBack("an unmodulated block with adaln_input")  # ComfyUI's forward asserts
    unscaled = x.new_zeros((b, width))  # norm(x) * (1 + 0): the producer's RMSNorm alone
    attn_out = _attention(attn, _norm_rows(block.attention_norm1, x, unscaled), x.shape, x_mask, freqs_cis,
                          transformer_options, dtype)
    rows, x = _seam_rows(block.attention_norm2, attn_out, None, block.ffn_norm1, x, unscaled)
    del attn_out
    return x + block.ffn_norm2(_feed_forward(ff, rows, x.shape, dtype))


FORWARDS = {
    "comfy.ldm.lumina.model:JointTransformerBlock": joint_transformer_block,
}
