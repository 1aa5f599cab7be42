"""Fused forward of Qwen-Image's double-stream block (``comfy.ldm.qwen_image.model.QwenImageTransformerBlock``).

It mirrors ComfyUI's ``QwenImageTransformerBlock.forward`` and its ``Attention.forward`` step by step; only the
inputs of the INT8 linear layers change where they come from:

* ``img_norm1`` / ``txt_norm1`` (LayerNorm without affine) + ``shift, scale`` write the q/k/v input of each stream
  as INT8 rows once (:func:`norm_modulate_quantize`); the three projections of a stream (``to_q, to_k, to_v`` and
  ``add_q_proj, add_k_proj, add_v_proj``) run their GEMMs on those same rows;
* the joint attention output ``[B, H, N, D]`` is quantized per stream without a transpose copy
  (:func:`quantize_heads`) for ``to_out[0]`` / ``to_add_out``;
* the gated residual ``x + gate1 * attn`` and ``img_norm2`` / ``txt_norm2`` + modulation are one producer pass
  writing the MLP's input rows (and the new residual stream);
* the MLP's tanh-GELU is fused with the quantization of ``net[2]``'s input (:func:`gelu_quantize`).

What stays ComfyUI's: the modulation projections ``img_mod`` / ``txt_mod`` (called as the block calls them), the
RMSNorm q/k norms (the block's own modules), ``apply_rope1`` and ``optimized_attention_masked`` as
``comfy.ldm.qwen_image.model`` binds them at call time (so ``--use-sage-attention`` and attention overrides keep
working), the text-mask layout and the stream order (text first) of the joint attention.

Torch ops rather than producers: none inside the fused path beyond what ComfyUI itself runs in torch (q/k RMSNorm,
RoPE, attention, the final gated residual ``addcmul``).

ComfyUI's forward runs instead (:class:`~.pieces.FallBack`) for:

* ``timestep_zero_index`` (Qwen-Image-Edit 2511's ``index_timestep_zero`` reference method): the image stream
  then has two modulations, one for the image tokens and one for the reference tokens (a per-token modulation
  that :func:`norm_modulate_quantize` does not take);
* an ``attn1_patch`` (applied to the joint q/k/v inside the attention) or any ``patches_replace``;
* a block whose attention, MLP or norms are not ComfyUI's classes as this forward knows them (another node pack
  swapped them, a LayerNorm with affine weights, a non-tanh GELU, dropout active in training mode);
* the checks of :func:`~.pieces.layers_take_rows` (float layer, LoRA side branch, weight patches, partial
  loading, no W8A8 kernel under ``auto``) and unknown keyword arguments.
"""

from __future__ import annotations

import torch
from torch import nn

from ....kernels.producers import gelu_quantize, norm_modulate_quantize, quantize_heads
from .pieces import FallBack, attention_heads, layers_take_rows, no_extra_arguments, no_patches, per_image

ATTENTION_PATCHES = ("attn1_patch",)


def _qwen_module():
    """``comfy.ldm.qwen_image.model``: its ``apply_rope1`` and ``optimized_attention_masked`` are read from it on
    every call, as ComfyUI's ``Attention.forward`` resolves them."""
    import comfy.ldm.qwen_image.model as qwen_model

    return qwen_model


def _plain_norm(norm, what: str) -> float:
    """``eps`` of a LayerNorm without affine parameters (what the producer computes); FallBack otherwise."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is not None or norm.bias is not None:
        raise FallBack(f"{what}: not a LayerNorm without affine parameters")
    return norm.eps


def _inactive(dropout, what: str) -> None:
    if not isinstance(dropout, nn.Dropout) or (dropout.training and dropout.p > 0):
        raise FallBack(f"{what}: active dropout or another module")


def _mlp_layers(mlp, qwen_model) -> tuple:
    """``(fc1, fc2)`` of Qwen-Image's FeedForward: ``GELU(proj, tanh)``, Dropout, Linear."""
    if type(mlp) is not qwen_model.FeedForward or len(mlp.net) != 3:
        raise FallBack(f"MLP {type(mlp).__name__}")
    act, dropout, fc2 = mlp.net
    if type(act) is not qwen_model.GELU or act.approximate != "tanh":
        raise FallBack("MLP activation other than tanh GELU")
    _inactive(dropout, "MLP")
    return act.proj, fc2


class _Stream:
    """One stream of the block (image or text): its layers, its modulation rows, its half of the attention."""

    def __init__(self, x: torch.Tensor, norm1, norm2, mlp, qkv: tuple, out, qwen_model, what: str):
        self.x, self.what = x, what
        self.eps1, self.eps2 = _plain_norm(norm1, f"{what} norm1"), _plain_norm(norm2, f"{what} norm2")
        self.fc1, self.fc2 = _mlp_layers(mlp, qwen_model)
        self.qkv_layers, self.out = qkv, out
        self.layers = (*qkv, out, self.fc1, self.fc2)

    def modulation(self, params: torch.Tensor) -> None:
        """``params`` = the stream's ``*_mod(temb)`` ``[B, 6 * dim]``: shift, scale, gate of each half-block."""
        b, _, width = self.x.shape
        first, second = params.chunk(2, dim=-1)
        self.shift1, self.scale1, self.gate1 = (per_image(t, b, width, self.what) for t in first.chunk(3, dim=-1))
        self.shift2, self.scale2, self.gate2 = (per_image(t, b, width, self.what) for t in second.chunk(3, dim=-1))

    def heads(self, heads: int, norm_q, norm_k) -> tuple:
        """q, k, v ``[B, H, N, D]`` from one INT8 copy of the modulated stream; q and k through their RMSNorms."""
        b, n, _ = self.x.shape
        rows, _ = norm_modulate_quantize(self.x, self.shift1, self.scale1, self.eps1)
        q, k, v = (layer.forward_int8(rows, self.x.dtype).view(b, n, heads, -1).transpose(1, 2)
                   for layer in self.qkv_layers)
        return norm_q(q.contiguous()), norm_k(k.contiguous()), v

    def finish(self, heads_out: torch.Tensor, after_out=None) -> torch.Tensor:
        """The stream after its part of the attention output ``[B, H, N, D]``: output projection, gated residual,
        MLP, gated residual."""
        b, n, width = self.x.shape
        dtype = self.x.dtype
        attn = self.out.forward_int8(quantize_heads(heads_out), dtype).view(b, n, width)
        if after_out is not None:
            attn = after_out(attn)
        rows, x = norm_modulate_quantize(self.x, self.shift2, self.scale2, self.eps2, y=attn, gate=self.gate1)
        hidden = self.fc1.forward_int8(rows, dtype)
        mlp = self.fc2.forward_int8(gelu_quantize(hidden), dtype).view(b, n, width)
        return torch.addcmul(x, self.gate2[:, None], mlp)


def _joint_mask(text_mask, batch: int, n_txt: int, n_img: int, like: torch.Tensor):
    """The additive mask of the joint sequence (text first): the text mask on the text keys, zeros on the image."""
    if text_mask is None:
        return None
    mask = torch.zeros((batch, 1, n_txt + n_img), dtype=like.dtype, device=like.device)
    mask[:, 0, :n_txt] = text_mask
    return mask


def transformer_block(block, mode, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                      image_rotary_emb=None, timestep_zero_index=None, transformer_options={}, **kwargs):
    """``QwenImageTransformerBlock.forward`` with producer-fed INT8 layers; returns ``(txt, img)`` as ComfyUI's."""
    no_extra_arguments(kwargs)
    if timestep_zero_index is not None:
        raise FallBack("timestep_zero_index (per-token modulation)")
    no_patches(transformer_options, ATTENTION_PATCHES)
    qwen_model = _qwen_module()
    attn = block.attn
    if type(attn) is not qwen_model.Attention or len(attn.to_out) != 2:
        raise FallBack(f"attention {type(attn).__name__}")
    _inactive(attn.to_out[1], "attention output")
    img = _Stream(hidden_states, block.img_norm1, block.img_norm2, block.img_mlp,
                  (attn.to_q, attn.to_k, attn.to_v), attn.to_out[0], qwen_model, "image stream")
    txt = _Stream(encoder_hidden_states, block.txt_norm1, block.txt_norm2, block.txt_mlp,
                  (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), attn.to_add_out, qwen_model, "text stream")
    layers_take_rows(img.layers, hidden_states, mode)
    layers_take_rows(txt.layers, encoder_hidden_states, mode)
    img.modulation(block.img_mod(temb))
    txt.modulation(block.txt_mod(temb))

    img_q, img_k, img_v = img.heads(attn.heads, attn.norm_q, attn.norm_k)
    txt_q, txt_k, txt_v = txt.heads(attn.heads, attn.norm_added_q, attn.norm_added_k)
    q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
    del img_q, img_k, img_v, txt_q, txt_k, txt_v
    batch, n_txt, n_img = hidden_states.shape[0], encoder_hidden_states.shape[1], hidden_states.shape[1]
    mask = _joint_mask(encoder_hidden_states_mask, batch, n_txt, n_img, hidden_states)
    q = qwen_model.apply_rope1(q, image_rotary_emb)
    k = qwen_model.apply_rope1(k, image_rotary_emb)
    out = attention_heads(qwen_model.optimized_attention_masked, q, k, v, mask, transformer_options)
    del q, k, v
    hidden_states = img.finish(out[:, :, n_txt:], attn.to_out[1])
    encoder_hidden_states = txt.finish(out[:, :, :n_txt])
    return encoder_hidden_states, hidden_states


FORWARDS = {
    "comfy.ldm.qwen_image.model:QwenImageTransformerBlock": transformer_block,
}
