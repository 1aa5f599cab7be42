"""Triton kernel: block-Hadamard rotation fused into dynamic per-row INT8 activation quantization.

For a layer stored Hadamard-rotated (see :mod:`comfyui_headroom.quant.rotation`) the activation must be
rotated before it is quantized. Doing that as a separate matmul writes and re-reads the whole
activation; here each program takes ``BLOCK_M`` rows, multiplies every ``GROUP``-wide slice by the
Hadamard matrix on the tensor cores (``tl.dot``) and quantizes the result, so the activation is read
like the plain quantize kernel reads it and the rotated float tensor never exists in memory.

Two passes over a row block: pass 1 finds each row's absolute maximum of the rotated values, pass 2
recomputes the rotation and writes ``int8`` (``x * (1/scale)``: like the plain quantize kernel, a
value within an ulp of a rounding tie may land one step away from the reference's division). The matrix is passed with entries ``+-1`` (exact in
any dtype, so bf16 products are exact and sums are float32) and the ``1/sqrt(GROUP)`` normalisation is
applied afterwards in float32. Result: the numbers of
:func:`comfyui_headroom.quant.rotation.rotate_quantize_activation_reference` up to float32 summation order.

Measured on the H100 the recomputation makes it slower than one cuBLAS bf16 rotation plus the plain quantize
kernel, so :func:`rotated_int8_linear` uses it only where the torch rotation would be a float32 matmul
(:func:`_torch_rotation_is_faster`).
"""

from __future__ import annotations

import logging
import math
import os

import torch

from .rotation import COMFY_ROTATION_GROUPS, check_group, hadamard
from .support import HAS_TRITON

if HAS_TRITON:  # the kernels exist only where Triton does; rotated_int8_linear works everywhere
    import triton
    import triton.language as tl

    from .launch import cached_launcher
    from .triton_quant import round_half_even

    @triton.jit
    def _load_group(x_ptr, rows, row_mask, stride_xm, k0, GROUP: tl.constexpr):
        """``x[rows, k0:k0+GROUP]`` (read once per group and pass; every column chunk reuses it)."""
        offs_g = tl.arange(0, GROUP)
        return tl.load(x_ptr + rows[:, None] * stride_xm + k0 + offs_g[None, :], mask=row_mask[:, None], other=0.0)

    @triton.jit
    def _rotate_chunk(x, h, norm, IEEE: tl.constexpr):
        """``(x @ h) * norm`` in float32, ``h`` a column chunk of the +-1 matrix."""
        if IEEE:  # fp32 activations (and bf16 under the interpreter, whose bf16 dot is wrong): no tf32
            y = tl.dot(x.to(tl.float32), h.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(x, h)
        return y * norm

    @triton.jit
    def _rotate_quantize_kernel(
        x_ptr, h_ptr, q_ptr, scale_ptr, M, K, stride_xm, norm,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        offs_n = tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, GROUP)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # Outer loop over column chunks of H, inner over the row's groups: each H chunk is read once per pass
        # and program (H is GROUP x GROUP: for 256 that is 128 KB, re-read per group it dominated the traffic).
        for n0 in range(0, GROUP, BLOCK_N):
            h = tl.load(h_ptr + offs_g[:, None] * GROUP + n0 + offs_n[None, :])
            for k0 in range(0, K, GROUP):
                x = _load_group(x_ptr, rows, row_mask, stride_xm, k0, GROUP)
                y = _rotate_chunk(x, h, norm, IEEE)
                amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 127.0), 1.0)
        inv_scale = 1.0 / scale  # one reciprocal per row, a multiply per element (as triton_quant does)
        for n0 in range(0, GROUP, BLOCK_N):
            h = tl.load(h_ptr + offs_g[:, None] * GROUP + n0 + offs_n[None, :])
            for k0 in range(0, K, GROUP):
                x = _load_group(x_ptr, rows, row_mask, stride_xm, k0, GROUP)
                y = _rotate_chunk(x, h, norm, IEEE)
                q = round_half_even(y * inv_scale[:, None])
                q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
                tl.store(q_ptr + rows[:, None] * K + k0 + n0 + offs_n[None, :], q, mask=row_mask[:, None])
        tl.store(scale_ptr + rows, scale, mask=row_mask)

    _launch_rotate_quantize = cached_launcher(_rotate_quantize_kernel)


_sign_cache: dict = {}


def _sign_matrix(group: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The unnormalised (+-1) Hadamard matrix in the activation's dtype."""
    key = (group, str(device), dtype)
    h = _sign_cache.get(key)
    if h is None:
        h = torch.sign(hadamard(group)).to(device=device, dtype=dtype).contiguous()
        _sign_cache[key] = h
    return h


def _ieee(dtype: torch.dtype) -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def rotate_quantize_rows(x: torch.Tensor, group: int, block_m: int | None = None,
                         num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (rows contiguous, K a multiple of ``group``) -> ``(int8 Q(x H) [M, K], float32 scale [M])``."""
    check_group(group)
    if not HAS_TRITON:
        raise RuntimeError("rotate_quantize_rows needs Triton; use quant.rotation.rotate_quantize_activation_reference")
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError(f"rotate_quantize_rows expects a 2-D tensor with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    if k % group:
        raise ValueError(f"width {k} is not a multiple of the rotation group {group}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"rotate_quantize_rows expects bf16/fp16/fp32 activations, got {x.dtype}")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block_m = block_m or (16 if m <= 16384 else 32)
    ieee = _ieee(x.dtype)
    # Shared memory (sm90, checked with ptxas): bf16 16x256 @ 256x64 chunks, 2 stages ~40 KB; fp32 needs 32-wide
    # chunks to stay near 50 KB. Older Triton releases allocate up to twice that: still far below 227 KB.
    block_n = min(group, 32 if ieee else 64)
    grid = (triton.cdiv(m, block_m),)
    _launch_rotate_quantize(
        grid, x, _sign_matrix(group, x.device, x.dtype), q, scale, m, k, x.stride(0), 1.0 / math.sqrt(group),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee, num_warps=num_warps, num_stages=2,
    )
    return q, scale


def rotated_int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    group: int,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for an int8 weight stored Hadamard-rotated (``Q(W H)``, group ``group``).

    Where the dispatcher would run the Triton W8A8 kernel for this call (forced or automatic, see
    :mod:`.dispatch`) and the torch rotation would be a float32 matmul (group 128, float32 activations), the
    activation is rotated and quantized by the fused kernel above and goes straight into the W8A8 GEMM
    (counted as ``triton_w8a8`` in the kernel stats). Everywhere else - CUDA bf16/fp16 with group 16/64/256
    (measured faster, see :func:`_torch_rotation_is_faster`), CPU, W8A16 at small M, ``int_mm``, the
    reference - the input is rotated first
    (:func:`..quant.rotation.rotate_activation`) and the dispatcher runs as for a plain layer. Under
    ``torch.compile`` (or when ``x`` needs a gradient) the call is the custom op
    ``torch.ops.headroom.rotated_int8_linear`` (:mod:`.ops`), which makes the same choice at run time.
    """
    if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
        return torch.ops.headroom.rotated_int8_linear(x, weight, weight_scale, bias, block_size, group)
    return rotated_int8_linear_eager(x, weight, weight_scale, bias, block_size, group)


def rotated_int8_linear_eager(x, weight, weight_scale, bias, block_size: int, group: int) -> torch.Tensor:
    """:func:`rotated_int8_linear` without the custom-op wrapper (what the op runs)."""
    from . import dispatch
    from .backends import check_args
    from .rotation import rotate_activation
    from .support import KernelUnsupported, interpreting

    if (x.is_cuda or interpreting()) and x.shape[-1] % group == 0 and not _torch_rotation_is_faster(x, group):
        check_args(x, weight, weight_scale, bias, block_size)
        if dispatch.choose_kernel(x, weight, weight_scale) == "triton_w8a8" and x.dtype in _ACTIVATION_DTYPES:
            from .triton_w8a8 import w8a8_matmul

            n, k = weight.shape
            x2 = x.reshape(-1, k)
            x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
            try:
                qa, a_scale = rotate_quantize_rows(x2, group)
                y = w8a8_matmul(qa, a_scale, weight, weight_scale, bias, x.dtype, block_size)
            except KernelUnsupported:
                pass
            except _OUT_OF_RESOURCES as err:  # a GPU with less shared memory than the tiles assume
                dispatch.log_once(("hadamard", str(err)), f"fused rotate+quantize cannot run here ({err}); "
                                   f"rotating with torch instead", logging.WARNING)
            else:
                dispatch.record_call("triton_w8a8", x2.shape[0], n, k)
                return y.reshape(*x.shape[:-1], n)
    return dispatch.int8_linear(rotate_activation(x, group), weight, weight_scale, bias, block_size)


_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUT_OF_RESOURCES = (triton.runtime.errors.OutOfResources,) if HAS_TRITON else ()


def _torch_rotation_is_faster(x: torch.Tensor, group: int) -> bool:
    """Where ``rotate_activation`` runs as one half-precision tensor-core GEMM (CUDA bf16/fp16, group 16/64/256),
    rotating with it and then quantizing beat the fused kernel by about 3x on the H100 (docs/PERFORMANCE.md,
    "## Rotation": 4096 x 3072, group 256: 36.5 us vs 114 us; the fused kernel's small-M ``tl.dot`` tiles
    recompute the rotation in two passes). The fused kernel serves the rest: group 128 and float32 activations,
    where the torch rotation is a float32 matmul."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and group in COMFY_ROTATION_GROUPS
