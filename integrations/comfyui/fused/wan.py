"""Fused forward of Wan 2.1 / 2.2's block (``comfy.ldm.wan.model.WanAttentionBlock``), with either of its
cross-attentions (``WanT2VCrossAttention``, ``WanI2VCrossAttention``).

It mirrors ComfyUI's ``WanAttentionBlock.forward`` step by step; what changes is where each linear layer's input
comes from:

* self-attention: ``norm1`` + modulation (``e[0]``, ``e[1]``) write the INT8 rows that q, k and v all take (one
  producer call, three GEMMs); q and k then go through ComfyUI's ``norm_q`` / ``norm_k`` (RMSNorm) and its
  ``apply_rope1``, exactly as ComfyUI's ``WanSelfAttention`` does;
* attention is ``optimized_attention`` as ``comfy.ldm.wan.model`` binds it, called with ComfyUI's own layout
  (``[B, N, H*D]``) plus ``skip_output_reshape=True``; the output projection's rows are quantized from the
  ``[B, H, N, D]`` result without a transpose copy (:func:`~comfyui_headroom.kernels.producers.quantize_heads`);
* cross-attention: the gated residual ``x + e[2] * y`` and ``norm3`` write the query's rows in one producer
  pass. Wan's ``norm3`` is a LayerNorm *with* weight and bias (``cross_attn_norm``); the producer has no affine
  LayerNorm, but ``layer_norm(x) * w + b`` is its ``layer_norm(x) * (1 + scale) + shift`` with ``scale = w - 1``
  and ``shift = b``, so the norm's parameters are handed to it as per-image modulation rows (float32). Where
  ``norm3`` is an Identity (``cross_attn_norm`` off) the residual is a torch ``addcmul`` and the rows are
  quantized with ``pieces.quantize_rows``. The text context (and for I2V the CLIP image
  context) is quantized once per call and feeds both k and v (k_img and v_img);
* FFN: the residual ``x + cross_attn`` (a gate of ones), ``norm2`` and its modulation (``e[3]``, ``e[4]``) write
  fc1's rows in one producer, the tanh GELU is fused with fc2's quantization, and the
  last gated residual is ComfyUI's ``addcmul``.

ComfyUI's forward runs instead (:class:`~.pieces.FallBack`) for: per-token modulation (Wan 2.2 TI2V's ``e`` of
shape ``[B, L, 6, C]`` with ``L > 1``, which ComfyUI spreads over the tokens with ``repeat_e``), the ``attn1_patch``
/ ``attn2_patch`` patches and block replacements, a cross-attention of another class (S2V / HuMo / VACE blocks are
subclasses and keep their own forward anyway), a norm / FFN of another shape than Wan's, LoRA side branches
and weight patch functions, weights left on another device, and keyword arguments this forward does not know.
"""

from __future__ import annotations

import torch
from torch import nn

from ....kernels.producers import gelu_quantize, norm_modulate_quantize, quantize_heads
from .pieces import (
    FallBack,
    layers_take_rows,
    no_extra_arguments,
    no_patches,
    per_image,
    quantize_rows,
)

# transformer_options["patches"] keys that WanAttentionBlock and WanSelfAttention apply
PATCHES = ("attn1_patch", "attn2_patch")


def _wan_model():
    """``comfy.ldm.wan.model``: its ``optimized_attention`` and ``apply_rope1`` are looked up at call time, as
    ComfyUI's forward does (a node pack that rebinds them is followed)."""
    import comfy.ldm.wan.model as wan_model

    return wan_model


def _attention(wan_model, q, k, v, heads: int, transformer_options) -> torch.Tensor:
    """ComfyUI's attention on ``[B, N, H*D]`` q, k, v as WanSelfAttention calls it, its output kept per head."""
    return wan_model.optimized_attention(q, k, v, heads=heads, skip_output_reshape=True,
                                         transformer_options=transformer_options)


def _attention_rows(out: torch.Tensor):
    """The output projection's INT8 rows: from ``[B, H, N, D]`` without a transpose copy, or from ``[B, N, H*D]``
    where an attention function (an override, or attention_pytorch over SDP_BATCH_LIMIT) reshaped anyway."""
    return quantize_heads(out) if out.ndim == 4 else quantize_rows(out)


def _check_structure(block) -> tuple:
    """FallBack unless the block is laid out as Wan's; -> the linear layers the fused path feeds."""
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not isinstance(norm, nn.LayerNorm) or norm.weight is not None:
            raise FallBack(f"{name} is not a LayerNorm without affine")
    if not isinstance(block.norm3, nn.Identity) and not isinstance(block.norm3, nn.LayerNorm):
        raise FallBack(f"norm3 {type(block.norm3).__name__}")
    ffn = block.ffn
    if not (isinstance(ffn, nn.Sequential) and len(ffn) == 3 and isinstance(ffn[1], nn.GELU)
            and ffn[1].approximate == "tanh"):
        raise FallBack("FFN is not Linear, GELU(tanh), Linear")
    wan_model = _wan_model()
    cross = type(block.cross_attn)
    if cross is wan_model.WanT2VCrossAttention:
        cross_layers = ()
    elif cross is wan_model.WanI2VCrossAttention:
        cross_layers = (block.cross_attn.k_img, block.cross_attn.v_img)
    else:
        raise FallBack(f"cross-attention {cross.__name__}")
    if type(block.self_attn) is not wan_model.WanSelfAttention:
        raise FallBack(f"self-attention {type(block.self_attn).__name__}")
    attn, cross_attn = block.self_attn, block.cross_attn
    return (attn.q, attn.k, attn.v, attn.o, cross_attn.q, cross_attn.k, cross_attn.v, cross_attn.o,
            *cross_layers, ffn[0], ffn[2])


def _modulation(block, e: torch.Tensor, x: torch.Tensor) -> list:
    """The six modulation vectors of this call as ``[B, C]`` rows: ComfyUI's sum of the block's parameter and
    ``e`` (``[B, 6, C]`` or ``[B, L, 6, C]``); FallBack when they are per token."""
    import comfy.model_management

    own = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    if e.ndim < 4:
        parts = (own + e).chunk(6, dim=1)
    else:
        parts = (own.unsqueeze(0) + e).unbind(2)
    b, _, width = x.shape
    return [per_image(t, b, width, "Wan block") for t in parts]


def _ones_like_rows(t: torch.Tensor) -> torch.Tensor:
    """Ones in ``t``'s shape and strides: the producer reads shift, scale and gate with one row stride."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).fill_(1)


def _norm3_rows(norm, x, y, gate):
    """``x + gate * y`` and the INT8 rows of ``norm3`` of it (the cross-attention query's input)."""
    b, _, width = x.shape
    if isinstance(norm, nn.Identity):
        x = torch.addcmul(x, y, gate[:, None])
        return quantize_rows(x), x
    if tuple(norm.normalized_shape) != (width,):
        raise FallBack(f"norm3 over {tuple(norm.normalized_shape)}")
    if getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None):
        raise FallBack("weight or bias patch functions")
    if any(p is not None and p.device != x.device for p in (norm.weight, norm.bias)):
        raise FallBack("weight on another device (partial loading)")
    # layer_norm(x) * w + b as the producer's layer_norm(x) * (1 + scale) + shift, gate alongside: one row
    # stride for the three, as the producer's kernel takes them
    mods = torch.zeros(b, 3, width, dtype=torch.float32, device=x.device)
    if norm.bias is not None:
        mods[:, 0] = norm.bias
    if norm.weight is not None:
        mods[:, 1] = norm.weight.float() - 1
    mods[:, 2] = gate
    shift, scale, gate = mods.unbind(1)
    rows, x = norm_modulate_quantize(x, shift, scale, norm.eps, y=y, gate=gate)
    return rows, x


def _self_attention(attn, rows, freqs, b: int, n: int, dtype, transformer_options) -> torch.Tensor:
    """``WanSelfAttention.forward`` on the producer's rows of its input -> ``[B, N, C]``."""
    wan_model = _wan_model()
    heads, d = attn.num_heads, attn.head_dim
    q = wan_model.apply_rope1(attn.norm_q(attn.q.forward_int8(rows, dtype).view(b, n, -1)).view(b, n, heads, d),
                              freqs)
    k = wan_model.apply_rope1(attn.norm_k(attn.k.forward_int8(rows, dtype).view(b, n, -1)).view(b, n, heads, d),
                              freqs)
    v = attn.v.forward_int8(rows, dtype).view(b, n, heads * d)
    out = _attention(wan_model, q.view(b, n, heads * d), k.view(b, n, heads * d), v, heads, transformer_options)
    del q, k, v
    return attn.o.forward_int8(_attention_rows(out), dtype).view(b, n, -1)


def _context_kv(k_layer, v_layer, k_norm, context):
    """k and v of a cross-attention from one quantization of ``context [B, L, C]``."""
    b, length, _ = context.shape
    rows = quantize_rows(context)
    k = k_norm(k_layer.forward_int8(rows, context.dtype).view(b, length, -1))
    v = v_layer.forward_int8(rows, context.dtype).view(b, length, -1)
    return k, v


def _cross_attention(attn, rows, context, context_img_len, b: int, n: int, dtype, transformer_options):
    """``WanT2VCrossAttention.forward`` / ``WanI2VCrossAttention.forward`` on the producer's query rows."""
    wan_model = _wan_model()
    q = attn.norm_q(attn.q.forward_int8(rows, dtype).view(b, n, -1))
    if type(attn) is wan_model.WanI2VCrossAttention:
        context_img, context = context[:, :context_img_len], context[:, context_img_len:]
        k_img, v_img = _context_kv(attn.k_img, attn.v_img, attn.norm_k_img, context_img)
        out_img = _attention(wan_model, q, k_img, v_img, attn.num_heads, transformer_options)
        del k_img, v_img
        k, v = _context_kv(attn.k, attn.v, attn.norm_k, context)
        out = _attention(wan_model, q, k, v, attn.num_heads, transformer_options) + out_img
    else:
        k, v = _context_kv(attn.k, attn.v, attn.norm_k, context)
        out = _attention(wan_model, q, k, v, attn.num_heads, transformer_options)
    del q, k, v
    return attn.o.forward_int8(_attention_rows(out), dtype).view(b, n, -1)


def wan_attention_block(block, mode, x, e, freqs, context, context_img_len=257,
                        transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature; never mutated)
    """``WanAttentionBlock.forward`` with producer-fed INT8 layers."""
    no_extra_arguments(kwargs)
    no_patches(transformer_options, PATCHES)
    layers_take_rows(_check_structure(block), x, mode)
    shift1, scale1, gate1, shift2, scale2, gate2 = _modulation(block, e, x)
    x = x.contiguous()
    b, n, _ = x.shape
    dtype = x.dtype

    rows, _ = norm_modulate_quantize(x, shift1, scale1, block.norm1.eps)
    y = _self_attention(block.self_attn, rows, freqs, b, n, dtype, transformer_options)
    rows, x = _norm3_rows(block.norm3, x, y, gate1)
    del y
    y = _cross_attention(block.cross_attn, rows, context, context_img_len, b, n, dtype, transformer_options)
    # the ungated residual x + y folded into norm2's producer as a gate of ones (rounded to x's dtype before the
    # norm, as ComfyUI's x + y is)
    rows, x = norm_modulate_quantize(x, shift2, scale2, block.norm2.eps, y=y, gate=_ones_like_rows(shift2))
    del y
    hidden = block.ffn[0].forward_int8(rows, dtype)
    y = block.ffn[2].forward_int8(gelu_quantize(hidden), dtype).view(b, n, -1)
    return torch.addcmul(x, y, gate2[:, None])


FORWARDS = {
    "comfy.ldm.wan.model:WanAttentionBlock": wan_attention_block,
}
