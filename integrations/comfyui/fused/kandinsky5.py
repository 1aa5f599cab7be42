"""Fused forwards of Kandinsky 5's blocks (``comfy.ldm.kandinsky5.model``): ``TransformerEncoderBlock`` (the text
blocks: self-attention + MLP) and ``TransformerDecoderBlock`` (the visual blocks: self-attention, cross-attention to
the text, MLP).

Each mirrors its ComfyUI forward (with ``SelfAttention`` / ``CrossAttention`` / ``FeedForward`` written out inside
it); what changes is only where the INT8 layers' inputs come from:

* LayerNorm (no affine) + ``* (1 + scale) + shift``, and from the second sub-block on the gated residual
  ``x + gate * out`` of the one before, write the next layers' input as INT8 rows in one pass
  (:func:`~comfyui_headroom.kernels.producers.norm_modulate_quantize`); ``to_query``, ``to_key`` and ``to_value``
  of the self-attention take the same input, so one producer call feeds all three;
* the cross-attention's ``to_key`` / ``to_value`` read the text context (not modulated): its rows are quantized
  once per call (``pieces.quantize_rows``) and feed both;
* the attention output stays ``[B, H, N, D]`` (``skip_output_reshape``) and is quantized from there for
  ``out_layer`` (``quantize_heads``), no transpose copy;
* the MLP's activation, ``nn.GELU()`` in its exact (erf) form, is fused with the quantization of ``out_layer``'s input
  (``gelu_quantize(h, approximate="none")``).

* the self-attention's q/k RMSNorms (the weights and eps of ``query_norm`` / ``key_norm``) and RoPE, with v in the
  attention's ``[B, H, N, D]`` layout, are one pass (:func:`.pieces.joint_heads`); where that pass does not apply (a
  norm with patch functions, another node pack's ``apply_rope1``) ComfyUI's modules and ``apply_rope1`` run them.

The cross-attention's q/k norms stay the modules' (no RoPE there). Attention is
``comfy.ldm.kandinsky5.model.optimized_attention`` (``--use-sage-attention`` etc. keep working).

ComfyUI splits sequences longer than 8192 tokens into chunks for the q/k projections + norm + RoPE and for the MLP,
to bound memory; those ops work token by token, so the answer is the same: the fused forward runs the q/k path
whole and the MLP over the same number of row chunks.

Falls back (ComfyUI's forward runs that call): an ``optimized_attention_override`` in ``transformer_options`` (an
attention replacement), ``patches_replace`` (e.g. a ``dit`` double-block replacement, whose wrapper calls the block
again), a replaced module-level attention function, per-token modulation, a LayerNorm with an affine weight, a LoRA /
weight patch or partial loading on any fused layer, gradients, unknown arguments.
"""

from __future__ import annotations

import torch
from torch import nn

from ....kernels.producers import Int8Rows, gelu_quantize, norm_modulate_quantize, quantize_heads
from .pieces import (
    FallBack,
    attention_heads,
    joint_heads,
    layers_take_rows,
    no_extra_arguments,
    no_patches,
    per_image,
    quantize_rows,
)


def _kandinsky5():
    """``comfy.ldm.kandinsky5.model``; FallBack when something replaced the attention function its blocks call."""
    import comfy.ldm.kandinsky5.model as k5
    import comfy.ldm.modules.attention as attention

    if k5.optimized_attention is not attention.optimized_attention:
        raise FallBack("comfy.ldm.kandinsky5.model.optimized_attention replaced")
    return k5


def _call_checks(transformer_options, kwargs) -> None:
    no_extra_arguments(kwargs)
    if "optimized_attention_override" in transformer_options:
        raise FallBack("transformer_options optimized_attention_override")
    no_patches(transformer_options, ())


def _plain_norms(*norms) -> None:
    for norm in norms:
        if getattr(norm, "weight", None) is not None or getattr(norm, "bias", None) is not None:
            raise FallBack("LayerNorm with affine weight")


def _shift_scale_gate(params: torch.Tensor, batch: int, width: int, what: str) -> tuple:
    """``get_shift_scale_gate`` as ``[B, dim]`` producer rows."""
    return tuple(per_image(t, batch, width, what) for t in torch.chunk(params, 3, dim=-1))


def _attention_layers(attn) -> tuple:
    return attn.to_query, attn.to_key, attn.to_value, attn.out_layer


def _ffn_layers(ff) -> tuple:
    return ff.in_layer, ff.out_layer


def _heads_out(k5, attn, q, k, v, transformer_options, dtype, shape) -> torch.Tensor:
    """ComfyUI's attention on ``q, k, v [B, N, H, D]`` -> ``out_layer`` of it, ``[B, N, dim]``."""
    b, n, _ = shape
    out = attention_heads(k5.optimized_attention, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                          transformer_options)
    return attn.out_layer.forward_int8(quantize_heads(out), dtype).view(b, n, -1)


def _self_attention(attn, rows, shape, freqs, transformer_options, dtype) -> torch.Tensor:
    """``SelfAttention.forward`` on its INT8 input rows (shared by the three projections)."""
    k5 = _kandinsky5()
    b, n, _ = shape
    q, k, v = (layer.forward_int8(rows, dtype).view(b, n, attn.num_heads, -1)
               for layer in (attn.to_query, attn.to_key, attn.to_value))
    if getattr(k5.apply_rope1, "__module__", None) == "comfy.ldm.flux.math":  # ComfyUI's own RoPE: one pass
        heads = joint_heads([(q, k, v, attn.query_norm, attn.key_norm)], freqs.movedim(1, 2))  # pe [B, 1, N, ...]
        if heads is not None:
            out = attention_heads(k5.optimized_attention, *heads, None, transformer_options)
            return attn.out_layer.forward_int8(quantize_heads(out), dtype).view(b, n, -1)
    q, k = k5.apply_rope1(attn.query_norm(q), freqs), k5.apply_rope1(attn.key_norm(k), freqs)
    return _heads_out(k5, attn, q, k, v, transformer_options, dtype, shape)


def _cross_attention(attn, rows, shape, context, transformer_options, dtype) -> torch.Tensor:
    """``CrossAttention.forward``: the query from the visual rows, key and value from the text context's rows."""
    k5 = _kandinsky5()
    b, n, _ = shape
    context_rows = quantize_rows(context)
    q = attn.to_query.forward_int8(rows, dtype).view(b, n, attn.num_heads, -1)
    k = attn.to_key.forward_int8(context_rows, dtype).view(*context.shape[:-1], attn.num_heads, -1)
    v = attn.to_value.forward_int8(context_rows, dtype).view(*context.shape[:-1], attn.num_heads, -1)
    return _heads_out(k5, attn, attn.query_norm(q), attn.key_norm(k), v, transformer_options, dtype, shape)


def _activation_producer(act):
    if not isinstance(act, nn.GELU):
        raise FallBack(f"MLP activation {type(act).__name__}")
    return lambda h: gelu_quantize(h, approximate=act.approximate)  # "none" (exact) in Kandinsky 5, or "tanh"


def _feed_forward(ff, rows, shape, dtype) -> torch.Tensor:
    """``FeedForward.forward`` on its INT8 input rows; in ComfyUI's chunks of rows past 8192 tokens."""
    b, n, _ = shape
    produce = _activation_producer(ff.activation)
    pieces = 4 if n > 8192 else 1  # ComfyUI's FeedForward.num_chunks over the tokens
    outs = [ff.out_layer.forward_int8(produce(ff.in_layer.forward_int8(Int8Rows(q, s), dtype)), dtype)
            for q, s in zip(rows[0].chunk(pieces), rows[1].chunk(pieces))]
    return (outs[0] if pieces == 1 else torch.cat(outs)).view(b, n, -1)


def encoder_block(block, mode, x, time_embed, freqs, transformer_options={}, **kwargs):
    """``TransformerEncoderBlock.forward`` (text) with producer-fed INT8 layers."""
    _call_checks(transformer_options, kwargs)
    _plain_norms(block.self_attention_norm, block.feed_forward_norm)
    layers_take_rows(_attention_layers(block.self_attention) + _ffn_layers(block.feed_forward), x, mode)
    b, n, width = x.shape
    dtype = x.dtype
    attn_params, ff_params = torch.chunk(block.text_modulation(time_embed), 2, dim=-1)
    shift, scale, gate = _shift_scale_gate(attn_params, b, width, "text block")
    rows, _ = norm_modulate_quantize(x, shift, scale, block.self_attention_norm.eps)
    out = _self_attention(block.self_attention, rows, x.shape, freqs, transformer_options, dtype)

    shift, scale, next_gate = _shift_scale_gate(ff_params, b, width, "text block")
    rows, x = norm_modulate_quantize(x, shift, scale, block.feed_forward_norm.eps, y=out, gate=gate)
    out = _feed_forward(block.feed_forward, rows, x.shape, dtype)
    return torch.addcmul(x, next_gate[:, None], out)


def decoder_block(block, mode, visual_embed, text_embed, time_embed, freqs, transformer_options={}, **kwargs):
    """``TransformerDecoderBlock.forward`` (visual) with producer-fed INT8 layers."""
    _call_checks(transformer_options, kwargs)
    _plain_norms(block.self_attention_norm, block.cross_attention_norm, block.feed_forward_norm)
    layers_take_rows(_attention_layers(block.self_attention) + _attention_layers(block.cross_attention)
                     + _ffn_layers(block.feed_forward), visual_embed, mode)
    x = visual_embed
    b, n, width = x.shape
    dtype = x.dtype
    attn_params, cross_params, ff_params = torch.chunk(block.visual_modulation(time_embed), 3, dim=-1)
    # self attention
    shift, scale, gate = _shift_scale_gate(attn_params, b, width, "visual block")
    rows, _ = norm_modulate_quantize(x, shift, scale, block.self_attention_norm.eps)
    out = _self_attention(block.self_attention, rows, x.shape, freqs, transformer_options, dtype)
    # cross attention (the self-attention's gated residual first)
    shift, scale, next_gate = _shift_scale_gate(cross_params, b, width, "visual block")
    rows, x = norm_modulate_quantize(x, shift, scale, block.cross_attention_norm.eps, y=out, gate=gate)
    out = _cross_attention(block.cross_attention, rows, x.shape, text_embed, transformer_options, dtype)
    # feed forward (the cross-attention's gated residual first)
    shift, scale, gate = _shift_scale_gate(ff_params, b, width, "visual block")
    rows, x = norm_modulate_quantize(x, shift, scale, block.feed_forward_norm.eps, y=out, gate=next_gate)
    out = _feed_forward(block.feed_forward, rows, x.shape, dtype)
    return torch.addcmul(x, gate[:, None], out)


FORWARDS = {
    "comfy.ldm.kandinsky5.model:TransformerEncoderBlock": encoder_block,
    "comfy.ldm.kandinsky5.model:TransformerDecoderBlock": decoder_block,
}
