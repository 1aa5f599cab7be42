"""``torch.library`` custom ops (namespace ``headroom``) so ``torch.compile`` traces INT8 layers whole.

* ``headroom::int8_linear``   - the dispatcher: picks the kernel at run time (see :mod:`.dispatch`);
* ``headroom::triton_w8a8``, ``headroom::triton_w8a16``, ``headroom::int_mm``, ``headroom::reference``
  - one backend each, for callers that want a fixed kernel inside a compiled graph;
* ``headroom::quantize_activation`` - per-row INT8 of a 2-D activation;
* ``headroom::rotated_int8_linear`` - a Hadamard-rotated layer (:mod:`.hadamard`: rotation fused into the
  activation quantization where the Triton W8A8 kernel runs); ``headroom::hadamard_rotate`` - ``x H``.
* the producers of :mod:`.producers` (an op that writes a W8A8 layer's input in INT8), each returning
  ``(q int8 [M, K], scale float32 [M])``: ``headroom::norm_modulate_quantize``,
  ``headroom::norm_modulate_quantize_residual`` (also returns the new residual stream),
  ``headroom::quantize_heads``, ``headroom::gelu_quantize``, ``headroom::silu_mul_quantize``,
  ``headroom::rms_norm_scale_quantize``, ``headroom::rms_norm_residual_scale_quantize`` (also returns the new
  residual stream), ``headroom::heads_activation_quantize``; and ``headroom::int8_linear_int8_input``, the GEMM on
  such rows (:func:`.dispatch.int8_linear_int8_input`: kernel chosen at run time). The public functions call them
  only under ``torch.compile``; eager calls skip the dispatcher. No autograd: INT8 rows carry no gradient (layers
  that need one keep the float path, see ``Int8Linear.takes_int8_input``). Every output is contiguous, as the
  fakes say: inductor lays out what follows from the fake's strides.

Each has a fake (meta) implementation giving the output's shape/dtype, so dynamo and inductor never
run a kernel while tracing, and an autograd formula (gradient through the dequantized weight). Stats and checks run inside the real implementations, at run time.
(No ``from __future__ import annotations`` here: ``custom_op`` reads the annotations as types.)
"""

from typing import Optional, Tuple

import torch

from . import backends, producers
from .dispatch import check_int8_rows, dispatch_and_run, int8_linear_int8_input_eager, run_kernel
from .int8 import dequantize_weight

NAMESPACE = "headroom"


def _registered(name: str) -> bool:
    """True when another import of this package (ComfyUI's path-based one, say) already defined it."""
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _fake_linear(x, weight, weight_scale, bias, block_size):
    backends.check_args(x, weight, weight_scale, bias, block_size)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _define_linear(name: str, impl) -> None:
    if _registered(name):
        return

    def op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
           block_size: int) -> torch.Tensor:
        return impl(x, weight, weight_scale, bias, block_size)

    op.__name__ = name
    custom = torch.library.custom_op(f"{NAMESPACE}::{name}", op, mutates_args=())
    custom.register_fake(_fake_linear)
    custom.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _linear_setup_context(ctx, inputs, output):
    x, weight, weight_scale, bias, block_size = inputs
    ctx.save_for_backward(weight, weight_scale)
    ctx.block_size = block_size
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad):
    """Gradients for x (and bias) through the dequantized weight: LoRA training on INT8 layers works."""
    weight, weight_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_weight(weight, weight_scale, grad.dtype, ctx.block_size)
        grad_x = (grad @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


def _fixed_kernel(name: str):
    def impl(x, weight, weight_scale, bias, block_size):
        backends.check_args(x, weight, weight_scale, bias, block_size)
        return run_kernel(name, x, weight, weight_scale, bias, block_size)

    return impl


_define_linear("int8_linear", dispatch_and_run)
for _name in backends.KERNELS:
    _define_linear(_name, _fixed_kernel(_name))

if not _registered("quantize_activation"):

    @torch.library.custom_op(f"{NAMESPACE}::quantize_activation", mutates_args=())
    def quantize_activation(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 2:
            raise ValueError(f"quantize_activation expects a 2-D [tokens, features] tensor, got {tuple(x.shape)}")
        x2 = x if x.stride(-1) == 1 else x.contiguous()
        return backends.quantize_rows(x2)

    @quantize_activation.register_fake
    def _(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


if not _registered("hadamard_rotate"):

    @torch.library.custom_op(f"{NAMESPACE}::hadamard_rotate", mutates_args=())
    def hadamard_rotate(x: torch.Tensor, group: int) -> torch.Tensor:
        """``x H`` per ``group`` of the last dim (an op: the cached Hadamard matrix never enters a traced graph)."""
        from .rotation import rotate_activation

        return rotate_activation(x, group)

    @hadamard_rotate.register_fake
    def _(x, group):
        return torch.empty_like(x)

    def _hadamard_rotate_backward(ctx, grad):
        return torch.ops.headroom.hadamard_rotate(grad, ctx.group), None  # H is symmetric and orthonormal

    def _hadamard_rotate_setup(ctx, inputs, output):
        ctx.group = inputs[1]

    hadamard_rotate.register_autograd(_hadamard_rotate_backward, setup_context=_hadamard_rotate_setup)


if not _registered("rotated_int8_linear"):

    @torch.library.custom_op(f"{NAMESPACE}::rotated_int8_linear", mutates_args=())
    def rotated_int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: Optional[torch.Tensor], block_size: int, group: int) -> torch.Tensor:
        from .hadamard import rotated_int8_linear_eager

        return rotated_int8_linear_eager(x, weight, weight_scale, bias, block_size, group)

    @rotated_int8_linear.register_fake
    def _(x, weight, weight_scale, bias, block_size, group):
        if x.shape[-1] % group:
            raise ValueError(f"width {x.shape[-1]} is not a multiple of the rotation group {group}")
        return _fake_linear(x, weight, weight_scale, bias, block_size)

    def _rotated_setup_context(ctx, inputs, output):
        x, weight, weight_scale, bias, block_size, group = inputs
        _linear_setup_context(ctx, (x, weight, weight_scale, bias, block_size), output)
        ctx.group = group

    def _rotated_backward(ctx, grad):
        """y = (x H) Wr^T with H symmetric orthonormal: dL/dx = (grad Wr) H, i.e. the plain formula, rotated."""
        grad_x, _, _, grad_bias, _ = _linear_backward(ctx, grad)
        if grad_x is not None:
            grad_x = torch.ops.headroom.hadamard_rotate(grad_x, ctx.group)
        return grad_x, None, None, grad_bias, None, None

    rotated_int8_linear.register_autograd(_rotated_backward, setup_context=_rotated_setup_context)



# ------------------------------------------------------------------ producers and the GEMM on their INT8 rows

def _fake_rows(m, k, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return like.new_empty((m, k), dtype=torch.int8), like.new_empty((m,), dtype=torch.float32)


def _contiguous_rows(rows) -> Tuple[torch.Tensor, torch.Tensor]:
    return rows.q.contiguous(), rows.scale.contiguous()


if not _registered("norm_modulate_quantize"):

    @torch.library.custom_op(f"{NAMESPACE}::norm_modulate_quantize", mutates_args=())
    def norm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        rows, _ = producers.norm_modulate_quantize_eager(x, shift, scale, eps)
        return _contiguous_rows(rows)

    @norm_modulate_quantize.register_fake
    def _(x, shift, scale, eps):
        b, n, k = x.shape
        return _fake_rows(b * n, k, x)


if not _registered("norm_modulate_quantize_residual"):

    @torch.library.custom_op(f"{NAMESPACE}::norm_modulate_quantize_residual", mutates_args=())
    def norm_modulate_quantize_residual(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                                        y: torch.Tensor, gate: torch.Tensor
                                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, x_new = producers.norm_modulate_quantize_eager(x, shift, scale, eps, y, gate)
        return (*_contiguous_rows(rows), x_new.contiguous())

    @norm_modulate_quantize_residual.register_fake
    def _(x, shift, scale, eps, y, gate):
        b, n, k = x.shape
        return (*_fake_rows(b * n, k, x), x.new_empty((b, n, k)))


if not _registered("quantize_heads"):

    @torch.library.custom_op(f"{NAMESPACE}::quantize_heads", mutates_args=())
    def quantize_heads(o: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _contiguous_rows(producers.quantize_heads_eager(o))

    @quantize_heads.register_fake
    def _(o):
        b, h, n, d = o.shape
        return _fake_rows(b * n, h * d, o)


if not _registered("gelu_quantize"):

    @torch.library.custom_op(f"{NAMESPACE}::gelu_quantize", mutates_args=())
    def gelu_quantize(x: torch.Tensor, approximate: str = "tanh") -> Tuple[torch.Tensor, torch.Tensor]:
        return _contiguous_rows(producers.gelu_quantize_eager(x, approximate))

    @gelu_quantize.register_fake
    def _(x, approximate="tanh"):
        k = x.shape[-1]
        return _fake_rows(x.numel() // k, k, x)


if not _registered("silu_mul_quantize"):

    @torch.library.custom_op(f"{NAMESPACE}::silu_mul_quantize", mutates_args=())
    def silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _contiguous_rows(producers.silu_mul_quantize_eager(gate, up))

    @silu_mul_quantize.register_fake
    def _(gate, up):
        k = gate.shape[-1]
        return _fake_rows(gate.numel() // k, k, gate)


if not _registered("heads_activation_quantize"):

    @torch.library.custom_op(f"{NAMESPACE}::heads_activation_quantize", mutates_args=())
    def heads_activation_quantize(o: torch.Tensor, mlp: torch.Tensor,
                                  silu_gate: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return _contiguous_rows(producers.heads_activation_quantize_eager(o, mlp, silu_gate))

    @heads_activation_quantize.register_fake
    def _(o, mlp, silu_gate):
        b, h, n, d = o.shape
        return _fake_rows(b * n, h * d + (mlp.shape[-1] // 2 if silu_gate else mlp.shape[-1]), o)


if not _registered("rms_norm_scale_quantize"):

    @torch.library.custom_op(f"{NAMESPACE}::rms_norm_scale_quantize", mutates_args=())
    def rms_norm_scale_quantize(x: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor,
                                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _contiguous_rows(producers.rms_norm_scale_quantize_eager(x, weight, scale, eps))

    @rms_norm_scale_quantize.register_fake
    def _(x, weight, scale, eps):
        b, n, k = x.shape
        return _fake_rows(b * n, k, x)


if not _registered("rms_norm_residual_scale_quantize"):

    @torch.library.custom_op(f"{NAMESPACE}::rms_norm_residual_scale_quantize", mutates_args=())
    def rms_norm_residual_scale_quantize(x: torch.Tensor, y: torch.Tensor, y_weight: Optional[torch.Tensor],
                                         gate: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                                         scale: torch.Tensor, eps_y: float,
                                         eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, x_new = producers.rms_norm_residual_scale_quantize_eager(x, y, y_weight, gate, weight, scale, eps_y,
                                                                        eps)
        return (*_contiguous_rows(rows), x_new.contiguous())

    @rms_norm_residual_scale_quantize.register_fake
    def _(x, y, y_weight, gate, weight, scale, eps_y, eps):
        b, n, k = x.shape
        return (*_fake_rows(b * n, k, x), x.new_empty((b, n, k)))


if not _registered("int8_linear_int8_input"):

    @torch.library.custom_op(f"{NAMESPACE}::int8_linear_int8_input", mutates_args=())
    def int8_linear_int8_input(qa: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor,
                               weight_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                               block_size: int) -> torch.Tensor:
        return int8_linear_int8_input_eager(qa, a_scale, weight, weight_scale, bias, out_dtype,
                                            block_size).contiguous()

    @int8_linear_int8_input.register_fake
    def _(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size):
        check_int8_rows(qa, a_scale, weight)
        return qa.new_empty((qa.shape[0], weight.shape[0]), dtype=out_dtype)
