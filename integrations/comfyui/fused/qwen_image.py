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

* the q/k RMSNorms (the weights and eps of the block's own modules), RoPE and the joint sequence (text first) are
  written in one pass per stream (:func:`.pieces.joint_heads`); where that pass does not apply (a norm that is not
  a plain RMSNorm, another node pack's ``apply_rope1``) ComfyUI's own ops run them.

What stays ComfyUI's: the modulation projections ``img_mod`` / ``txt_mod`` (called as the block calls them) and
``optimized_attention_masked`` as ``comfy.ldm.qwen_image.model`` binds it at call time (so ``--use-sage-attention``
and attention overrides keep working), the text-mask layout of the joint attention, and the final gated residual
``addcmul`` (torch).

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
from .pieces import FallBack, attention_heads, joint_heads, layers_take_rows, no_extra_arguments, no_patches, \
    per_image

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

    def heads(self, heads: int) -> tuple:
        """q, k, v ``[B, N, H, D]`` from one INT8 copy of the modulated stream (before the q/k norms)."""
        b, n, _ = self.x.shape
        rows, _ = norm_modulate_quantize(self.x, self.shift1, self.scale1, self.eps1)
        return tuple(layer.forward_int8(rows, self.x.dtype).view(b, n, heads, -1) for layer in self.qkv_layers)

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


def _attention_inputs(qwen_model, txt_heads, txt_norms, img_heads, img_norms, rope) -> tuple:
    """Joint q, k, v ``[B, H, N_txt + N_img, D]`` (text first) with the streams' q/k RMSNorms and RoPE: one pass per
    stream (:func:`.pieces.joint_heads`) where that computes what ComfyUI's ops would, else those ops (the norms on
    contiguous ``[B, H, N, D]`` copies, ``torch.cat``, ``apply_rope1``), as ``Attention.forward`` runs them."""
    if getattr(qwen_model.apply_rope1, "__module__", None) == "comfy.ldm.flux.math":
        joint = joint_heads([(*txt_heads, *txt_norms), (*img_heads, *img_norms)], rope)
        if joint is not None:
            return joint
    streams = []
    for (q, k, v), (norm_q, norm_k) in ((txt_heads, txt_norms), (img_heads, img_norms)):
        streams.append((norm_q(q.transpose(1, 2).contiguous()), norm_k(k.transpose(1, 2).contiguous()),
                        v.transpose(1, 2)))
    q, k, v = (torch.cat(parts, dim=2) for parts in zip(*streams))
    return qwen_model.apply_rope1(q, rope), qwen_model.apply_rope1(k, rope), v


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

    q, k, v = _attention_inputs(qwen_model, txt.heads(attn.heads), (attn.norm_added_q, attn.norm_added_k),
                                img.heads(attn.heads), (attn.norm_q, attn.norm_k), image_rotary_emb)
    batch, n_txt, n_img = hidden_states.shape[0], encoder_hidden_states.shape[1], hidden_states.shape[1]
    mask = _joint_mask(encoder_hidden_states_mask, batch, n_txt, n_img, hidden_states)
    out = attention_heads(qwen_model.optimized_attention_masked, q, k, v, mask, transformer_options)
    del q, k, v
    hidden_states = img.finish(out[:, :, n_txt:], attn.to_out[1])
    encoder_hidden_states = txt.finish(out[:, :, :n_txt])
    return encoder_hidden_states, hidden_states


FORWARDS = {
    "comfy.ldm.qwen_image.model:QwenImageTransformerBlock": transformer_block,
}
