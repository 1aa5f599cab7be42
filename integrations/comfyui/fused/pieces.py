"""What every fused block forward needs: the per-call checks, modulation vectors as producer rows, the joint
attention's q/k/v written in one pass per stream, ComfyUI's attention with the heads kept apart (so the output
projection's producer reads them without a transpose copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ....kernels.attention_inputs import qk_norm_rope, rope_fits
from ....quant.linear import Int8Linear


class FallBack(Exception):
    """This call runs ComfyUI's own forward; the message says why (counted per block, :func:`.blocks.fused_stats`)."""


def layer_problem(layer, x: torch.Tensor, mode: str, check_kernel: bool = True) -> str | None:
    """Why ``layer`` cannot run on a producer's INT8 rows of ``x`` (None: it can). ``auto`` also needs the W8A8
    kernel to be what the dispatcher picks here (``check_kernel``: the one check that costs microseconds); ``on``
    takes any kernel (the reference GEMM on a CPU)."""
    if not isinstance(layer, Int8Linear) or layer.weight_scale is None:
        return "a float linear layer"
    if layer.lora or layer.rotation_group:
        return "LoRA side branch" if layer.lora else "Hadamard-rotated weight"
    if getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None):
        return "weight or bias patch functions"
    if layer.weight.device != x.device:
        return "weight on another device (partial loading)"
    if check_kernel and mode == "auto" and not layer.takes_int8_input(x):
        return "no W8A8 kernel for this call"
    return None


def layers_take_rows(layers: Iterable, x: torch.Tensor, mode: str) -> None:
    """FallBack unless every layer can run on a producer's INT8 rows of ``x`` (:func:`layer_problem`)."""
    for layer in layers:
        problem = layer_problem(layer, x, mode)
        if problem:
            raise FallBack(problem)


def no_patches(transformer_options: Mapping, patch_keys: Iterable[str]) -> None:
    """FallBack when ``transformer_options`` carries a patch this block would apply or a block replacement."""
    patches = transformer_options.get("patches") or {}
    for key in patch_keys:
        if patches.get(key):
            raise FallBack(f"transformer_options patch {key!r}")
    if any((transformer_options.get("patches_replace") or {}).values()):
        raise FallBack("transformer_options patches_replace")


def no_extra_arguments(kwargs: Mapping) -> None:
    """FallBack for keyword arguments a fused forward does not know (a newer ComfyUI's): never guess."""
    if kwargs:
        raise FallBack(f"unknown arguments {sorted(kwargs)}")


def per_image(t: torch.Tensor, batch: int, width: int, what: str) -> torch.Tensor:
    """A modulation vector ``[B, 1, K]`` or ``[B, K]`` as the ``[B, K]`` rows producers take (a view); FallBack
    for per-token modulation or anything else."""
    if t.ndim == 3 and t.shape[1] == 1:
        t = t[:, 0]
    if t.shape != (batch, width) or t.stride(-1) != 1:
        raise FallBack(f"{what} modulation of shape {tuple(t.shape)} (per token, or not [batch, width])")
    return t


def quantize_rows(t: torch.Tensor):
    """INT8 rows of ``t [..., K]`` as ``[M, K]``, for an input no producer writes (a text context, an activation
    computed with torch ops): one quantization pass (``headroom::quantize_activation``)."""
    return torch.ops.headroom.quantize_activation(t.reshape(-1, t.shape[-1]))


def attention_heads(attention, q, k, v, mask, transformer_options) -> torch.Tensor:
    """ComfyUI's attention function ``attention`` (``optimized_attention`` as the block's module bound it) on
    ``q, k, v [B, H, N, D]``, its output as ``[B, H, N, D]`` (a view that
    :func:`~comfyui_headroom.kernels.producers.quantize_heads` reads without a copy). An override in
    ``transformer_options`` that ignores ``skip_output_reshape`` and returns ``[B, N, H*D]`` is viewed back."""
    b, heads, n, d = q.shape
    out = attention(q, k, v, heads, mask=mask, skip_reshape=True, skip_output_reshape=True,
                    transformer_options=transformer_options)
    if out.ndim == 3:
        out = out.view(b, n, heads, -1).transpose(1, 2)
    return out


def rms_norm_params(norm, x: torch.Tensor) -> tuple | None:
    """``(weight or None, eps)`` of a q/k norm that :func:`~comfyui_headroom.kernels.attention_inputs.qk_norm_rope`
    computes as the module would on ``x [..., D]``: a torch ``RMSNorm`` over D (ComfyUI's ``operations.RMSNorm``)
    without patch functions, its weight on ``x``'s device. None otherwise (the block then calls the module)."""
    if not isinstance(norm, torch.nn.RMSNorm) or tuple(norm.normalized_shape) != (x.shape[-1],) \
            or getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None):
        return None
    weight = norm.weight
    if weight is not None and (weight.device != x.device or not weight.dtype.is_floating_point):
        return None
    # eps=None: torch's rms_norm takes the epsilon of the type it computes in (float32 for bf16/fp16 inputs)
    return weight, norm.eps if norm.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps


def joint_heads(streams, pe: torch.Tensor | None):
    """``(q, k, v) [B, H, N_1 + N_2 + ..., D]`` of a joint attention over ``streams`` (in order), each
    ``(q, k, v [B, N_i, H, D] views of its projection output, its q norm, its k norm)``: each stream normed, rotated
    by ``pe`` (ComfyUI's rotation matrices over the joint sequence, or None) and written into its rows in one pass
    (kernels/attention_inputs.py). None when a norm is not one :func:`rms_norm_params` reproduces or ``pe`` not
    the layout the pass reads: the block then runs ComfyUI's ops for them."""
    q0 = streams[0][0]
    b, _, heads, d = q0.shape
    total = sum(q.shape[1] for q, *_ in streams)
    params = [(rms_norm_params(nq, q), rms_norm_params(nk, k)) for q, k, _, nq, nk in streams]
    if any(p is None for pair in params for p in pair) or (pe is not None and not rope_fits(pe, b, total, d)):
        return None
    out = tuple(torch.empty((b, heads, total, d), dtype=q0.dtype, device=q0.device) for _ in range(3))
    offset = 0
    for (q, k, v, _, _), ((q_weight, eps_q), (k_weight, eps_k)) in zip(streams, params):
        qk_norm_rope(q, k, v, q_weight, k_weight, eps_q, eps_k, pe, out, offset)
        offset += q.shape[1]
    return out
