"""Launch plans: repeat an INT8 layer call without deciding anything again.

Why: a model calls each INT8 layer with the same shapes every step, and every call re-ran the same checks,
the kernel choice, the tile choice and two launch-cache keys: 55-60 us of host time on the H100 host against
15-20 us for a bf16 ``F.linear`` (docs/PERFORMANCE.md). A 24-block model at 4096 tokens then sits at the edge
of being CPU bound, and on a slower host it is (the INT8 step's CPU issue time equals its step time).

What: the first call with a given signature runs the normal path (which compiles and launches the kernels)
and then builds a :class:`LinearPlan`: the two kept compiled kernels (activation quantization, Gluon W8A8
GEMM) with their grids and constexprs. Later calls with the same signature allocate the three outputs and
launch both kernels directly. The signature is everything the normal path's decisions read: shapes, dtypes,
devices, contiguity and 16-byte alignment of the operands (:func:`signature`); the pointers themselves are
passed fresh on every call, so a plan never holds a tensor.

Only the Hopper W8A8 path (quantization + Gluon GEMM) is planned: other kernels, CPU tensors, the
``HEADROOM_LOG_KERNEL``/``HEADROOM_DEBUG`` switches, forced kernels, config overrides, direct launches
switched off and launch hooks (profilers) all take the normal path (:func:`comfyui_headroom.kernels.dispatch`
decides when plans may be used).
"""

from __future__ import annotations

import torch

from . import configs, gluon_w8a8, launch, triton_quant, triton_w8a8

MAX_PLANS = 4096
_ENABLED = True


def signature(x, weight, weight_scale, bias, block_size) -> tuple:
    """What the normal path's decisions depend on, for one call (not the data pointers)."""
    return (x.shape, x.dtype, x.device, x.is_contiguous(), x.data_ptr() & 15,
            weight.shape, weight.dtype, weight.device, weight.is_contiguous(), weight.data_ptr() & 15,
            weight_scale.shape, weight_scale.dtype, weight_scale.device, weight_scale.is_contiguous(),
            weight_scale.data_ptr() & 15,
            None if bias is None else (bias.shape, bias.dtype, bias.device, bias.is_contiguous(), bias.data_ptr() & 15),
            block_size)


def signature_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size) -> tuple:
    """:func:`signature` of a call whose activation is already INT8 (``Int8Linear.forward_int8``)."""
    return (signature(qa, weight, weight_scale, bias, block_size), a_scale.shape, a_scale.dtype,
            a_scale.is_contiguous(), a_scale.data_ptr() & 15, out_dtype)


class LinearPlan:
    """One planned signature: quantize ``x`` per row (``quant``; None when the input comes already in INT8),
    then the Gluon W8A8 GEMM."""

    __slots__ = ("m", "n", "k", "out_shape", "quant", "gemm", "gemm_grid", "device_index", "get_stream")

    def __init__(self, m, n, k, out_shape, quant, gemm, gemm_grid, device_index):
        from triton.runtime import driver

        self.m, self.n, self.k = m, n, k
        self.out_shape = out_shape
        self.quant, self.gemm, self.gemm_grid = quant, gemm, gemm_grid
        self.device_index = device_index
        self.get_stream = driver.active.get_current_stream

    def run(self, x, weight, weight_scale, bias) -> torch.Tensor:
        m, k = self.m, self.k
        qa = torch.empty((m, k), dtype=torch.int8, device=x.device)
        sa = torch.empty((m,), dtype=torch.float32, device=x.device)
        launch.launch_kept(self.quant, (m,), self.get_stream(self.device_index), (x, qa, sa, k, k))
        return self.run_int8(qa, sa, weight, weight_scale, bias, x.dtype).view(self.out_shape)

    def run_int8(self, qa, a_scale, weight, weight_scale, bias, out_dtype) -> torch.Tensor:
        out = torch.empty((self.m, self.n), dtype=out_dtype, device=qa.device)
        launch.launch_kept(self.gemm, self.gemm_grid, self.get_stream(self.device_index),
                           (qa, weight, out, a_scale, weight_scale, weight_scale if bias is None else bias,
                            self.m, self.n, self.k))
        triton_w8a8.LAST_COMPILED["gluon"] = self.gemm[0]
        return out


def build(x, weight, weight_scale, bias) -> LinearPlan | None:
    """A plan for calls like this one, made right after the normal path ran it (so both kernels are compiled
    and kept by their launchers); None where the call did not take the quantization + Gluon path."""
    if not x.is_cuda or not x.is_contiguous():
        return None
    k = x.shape[-1]
    m = x.numel() // max(k, 1)
    qa = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sa = torch.empty((m,), dtype=torch.float32, device=x.device)
    plan = build_int8_input(qa, sa, weight, weight_scale, bias, x.dtype)
    if plan is None:
        return None
    plan.out_shape = (*x.shape[:-1], plan.n)
    q_grid, q_args, q_kwargs = triton_quant.launch_args(x.view(m, k), qa, sa)
    plan.quant = triton_quant._launch_quantize_rows.lookup(q_args, q_kwargs)
    return plan if plan.quant is not None else None


def build_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype) -> LinearPlan | None:
    """The GEMM part of a plan (``quant`` left None): for a call whose activation came already in INT8, the whole
    plan. The kept Gluon kernel the normal path launched for these operands, or None where it took another
    kernel (or had nothing to compute)."""
    if not qa.is_cuda or not qa.is_contiguous() or not a_scale.is_contiguous() or not weight_scale.is_contiguous():
        return None
    if bias is not None and not bias.is_contiguous():
        return None
    m, k = qa.shape
    n = weight.shape[0]
    if m == 0 or k == 0 or n == 0:
        return None
    device = qa.device
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    mode = triton_w8a8.scale_mode_of(weight_scale)
    config = triton_w8a8._gluon_config(device, m, n, k, out, mode, (qa, weight, out))
    if config is None:
        return None
    grid, g_args, g_kwargs = gluon_w8a8.launch_args(qa, a_scale, weight, weight_scale, bias, out, config,
                                                    triton_w8a8._sm_count(device))
    gemm = gluon_w8a8._launch.lookup(g_args, g_kwargs)
    if gemm is None:
        return None
    return LinearPlan(m, n, k, (m, n), None, gemm, grid, device.index or 0)


def set_enabled(enabled: bool) -> None:
    """Switch launch plans on or off (benchmarks compare both; ``HEADROOM_FAST_LAUNCH=0`` also turns them off)."""
    global _ENABLED
    _ENABLED = enabled


def usable() -> bool:
    """Plans may replace the normal path: on, direct launches on, no launch hooks, no config override, Gluon on."""
    return (_ENABLED and launch.fast_launch_enabled() and configs._GLUON_ENABLED and not configs._override
            and not launch.hooks_active())
