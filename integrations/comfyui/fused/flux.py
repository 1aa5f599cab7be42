"""Fused forwards of ComfyUI's flux blocks (``comfy.ldm.flux.layers``): Flux, Flux 2 (global modulation, SiLU-gated
MLP) and HunyuanImage 2.1 / HunyuanVideo, which build the same two classes.

Each mirrors its ComfyUI forward line by line; what changes is only where a linear layer's input comes from:
norm + modulation (+ the gated residual of the previous half-block) write the qkv / MLP input as INT8 rows, the
attention output is quantized per stream straight from ``[B, H, N, D]``, the MLP activation is fused with its
quantization, and the q/k RMSNorms, RoPE and the joint text + image sequence are written in one pass per stream
(:func:`.pieces.joint_heads`; ComfyUI's QKNorm, ``torch.cat`` and ``apply_rope`` where that pass does not apply or
another node pack replaced ``apply_rope``). Attention is ComfyUI's ``optimized_attention``, as bound by
``comfy.ldm.flux.math``.
"""

from __future__ import annotations

import torch
from torch import nn

from ....kernels.producers import (
    gelu_quantize,
    heads_activation_quantize,
    norm_modulate_quantize,
    quantize_heads,
    silu_mul_quantize,
)
from .pieces import FallBack, attention_heads, joint_heads, layers_take_rows, no_extra_arguments, no_patches, \
    per_image

ATTENTION_PATCHES = ("attn1_patch", "attn1_output_patch")


def _flux_math():
    """``comfy.ldm.flux.math``; FallBack when something replaced the attention function the blocks call (another
    node pack's patch: its function is what ComfyUI's forward would run)."""
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.flux.math as flux_math

    if layers.attention is not flux_math.attention:
        raise FallBack("comfy.ldm.flux.layers.attention replaced")
    return flux_math


def _attention_inputs(flux_math, streams, pe) -> tuple:
    """q, k, v ``[B, H, N, D]`` of the (joint) attention over ``streams`` - ``(q, k, v [B, N_i, H, D], QKNorm)``,
    text first - with ComfyUI's q/k norms and RoPE: one pass per stream (:func:`.pieces.joint_heads`) where that
    computes what ComfyUI's ops would, else those ops (QKNorm, ``torch.cat``, ``apply_rope``)."""
    import comfy.ldm.flux.layers as layers

    plain = all(type(norm) is layers.QKNorm for *_, norm in streams) and (
        pe is None or getattr(flux_math.apply_rope, "__module__", None) == flux_math.__name__)
    heads = joint_heads([(q, k, v, norm.query_norm, norm.key_norm) for q, k, v, norm in streams], pe) \
        if plain else None
    if heads is not None:
        return heads
    normed = [(*norm(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), v.transpose(1, 2))
              for q, k, v, norm in streams]
    q, k, v = normed[0] if len(normed) == 1 else (torch.cat(parts, dim=2) for parts in zip(*normed))
    if pe is not None:
        q, k = flux_math.apply_rope(q, k, pe)
    return q, k, v


def _mlp_parts(mlp) -> tuple:
    """``(fc1, producer of fc2's rows, fc2)`` of a flux MLP: Linear, GELU(tanh) or SiLU gate, Linear."""
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 3:
        raise FallBack(f"MLP {type(mlp).__name__}")
    fc1, act, fc2 = mlp
    return fc1, _activation_producer(act), fc2


def _silu_gate(act) -> bool:
    """True for Flux 2's SiLU gate (``silu(first half) * second half``), False for tanh GELU; FallBack otherwise."""
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return False
    if type(act).__name__ == "SiLUActivation":
        return True
    raise FallBack(f"MLP activation {type(act).__name__}")


def _activation_producer(act):
    if _silu_gate(act):
        return lambda h: silu_mul_quantize(*h.chunk(2, dim=-1))
    return gelu_quantize


class _Stream:
    """One stream (img or txt) of a double block: its layers, its modulation rows and its qkv."""

    def __init__(self, block, name: str, x: torch.Tensor):
        self.x = x
        self.norm1, self.norm2 = getattr(block, f"{name}_norm1"), getattr(block, f"{name}_norm2")
        self.attn = getattr(block, f"{name}_attn")
        self.fc1, self.act, self.fc2 = _mlp_parts(getattr(block, f"{name}_mlp"))
        self.layers = (self.attn.qkv, self.attn.proj, self.fc1, self.fc2)

    def modulation(self, mod1, mod2) -> None:
        b, _, width = self.x.shape
        self.shift1, self.scale1, self.gate1 = (per_image(t, b, width, "double block") for t in
                                                (mod1.shift, mod1.scale, mod1.gate))
        self.shift2, self.scale2, self.gate2 = (per_image(t, b, width, "double block") for t in
                                                (mod2.shift, mod2.scale, mod2.gate))

    def qkv(self, heads: int) -> tuple:
        """q, k, v ``[B, N, H, D]``: views of the qkv projection of the modulated stream."""
        b, n, _ = self.x.shape
        rows, _ = norm_modulate_quantize(self.x, self.shift1, self.scale1, self.norm1.eps)
        qkv = self.attn.qkv.forward_int8(rows, self.x.dtype)
        return qkv.view(b, n, 3, heads, -1).unbind(2)

    def finish(self, heads_out: torch.Tensor) -> torch.Tensor:
        """The stream after its attention output ``[B, H, N, D]``: projection, gated residual, MLP, gated residual."""
        b, n, width = self.x.shape
        dtype = self.x.dtype
        attn = self.attn.proj.forward_int8(quantize_heads(heads_out), dtype).view(b, n, width)
        rows, x = norm_modulate_quantize(self.x, self.shift2, self.scale2, self.norm2.eps, y=attn, gate=self.gate1)
        hidden = self.fc1.forward_int8(rows, dtype)
        mlp = self.fc2.forward_int8(self.act(hidden), dtype).view(b, n, width)
        return torch.addcmul(x, self.gate2[:, None], mlp)


def double_stream_block(block, mode, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None,
                        modulation_dims_txt=None, transformer_options={}, **kwargs):
    """``DoubleStreamBlock.forward`` with producer-fed INT8 layers."""
    no_extra_arguments(kwargs)
    if modulation_dims_img is not None or modulation_dims_txt is not None:
        raise FallBack("modulation_dims")
    no_patches(transformer_options, ATTENTION_PATCHES)
    flux_math = _flux_math()
    img_stream, txt_stream = _Stream(block, "img", img), _Stream(block, "txt", txt)
    layers_take_rows(img_stream.layers, img, mode)
    layers_take_rows(txt_stream.layers, txt, mode)
    if block.modulation:
        img_stream.modulation(*block.img_mod(vec))
        txt_stream.modulation(*block.txt_mod(vec))
    else:
        (img_mods, txt_mods) = vec
        img_stream.modulation(*img_mods)
        txt_stream.modulation(*txt_mods)

    txt_heads, img_heads = txt_stream.qkv(block.num_heads), img_stream.qkv(block.num_heads)
    q, k, v = _attention_inputs(flux_math, [(*txt_heads, txt_stream.attn.norm), (*img_heads, img_stream.attn.norm)],
                                pe)
    del txt_heads, img_heads
    out = attention_heads(flux_math.optimized_attention, q, k, v, attn_mask, transformer_options)
    del q, k, v
    n_txt = txt.shape[1]
    img = img_stream.finish(out[:, :, n_txt:])
    txt = txt_stream.finish(out[:, :, :n_txt])
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_stream_block(block, mode, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={},
                        **kwargs):
    """``SingleStreamBlock.forward`` with producer-fed INT8 layers (linear2's input, attention output next to the
    MLP activation, is written as one INT8 row by one producer, as the layer multiplies it)."""
    no_extra_arguments(kwargs)
    if modulation_dims is not None:
        raise FallBack("modulation_dims")
    if block.yak_mlp:
        raise FallBack("yak MLP")
    silu_gate = _silu_gate(block.mlp_act)
    no_patches(transformer_options, ATTENTION_PATCHES)
    flux_math = _flux_math()
    layers_take_rows((block.linear1, block.linear2), x, mode)
    mod = block.modulation(vec)[0] if block.modulation else vec
    b, n, width = x.shape
    dtype = x.dtype
    shift, scale, gate = (per_image(t, b, width, "single block") for t in (mod.shift, mod.scale, mod.gate))

    rows, _ = norm_modulate_quantize(x, shift, scale, block.pre_norm.eps)
    qkv, mlp = torch.split(block.linear1.forward_int8(rows, dtype).view(b, n, -1),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = _attention_inputs(flux_math, [(*qkv.view(b, n, 3, block.num_heads, -1).unbind(2), block.norm)], pe)
    out = attention_heads(flux_math.optimized_attention, q, k, v, attn_mask, transformer_options)
    del q, k, v
    rows = heads_activation_quantize(out, mlp, silu_gate)
    output = block.linear2.forward_int8(rows, dtype).view(b, n, width)
    x = torch.addcmul(x, gate[:, None], output)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


FORWARDS = {
    "comfy.ldm.flux.layers:DoubleStreamBlock": double_stream_block,
    "comfy.ldm.flux.layers:SingleStreamBlock": single_stream_block,
}
