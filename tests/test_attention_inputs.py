"""kernels/attention_inputs.py on the CPU (torch path): q/k RMSNorm + RoPE + the joint head layout in one call,
against ComfyUI's sequence of ops written out here (norm on contiguous [B, H, N, D] copies, concatenation, then
``apply_rope1``: ``x_out = f[..., 0] * x[..., 0]; x_out.addcmul_(f[..., 1], x[..., 1])``)."""

import pytest
import torch
import torch.nn.functional as F

from comfyui_headroom.kernels.attention_inputs import qk_norm_rope, rope_fits


def comfy_rope(x, freqs):
    """ComfyUI's ``_apply_rope1`` (comfy/ldm/flux/math.py), restated."""
    x_ = x.to(dtype=freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    x_out = freqs[..., 0] * x_[..., 0]
    x_out.addcmul_(freqs[..., 1], x_[..., 1])
    return x_out.reshape(*x.shape).type_as(x)


def rotation_matrices(batch, tokens, d, gen):
    angles = torch.rand(batch, tokens, d // 2, generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(batch, 1, tokens, d // 2, 2, 2)


def stream(batch, tokens, heads, d, gen, dtype=torch.bfloat16):
    """q, k, v [B, N, H, D] as views of one qkv projection output, as a Flux block makes them."""
    qkv = torch.randn(batch, tokens, 3, heads, d, generator=gen).to(dtype)
    return qkv.unbind(2)


def reference(streams, weights, eps, pe):
    normed = []
    for (q, k, v), (wq, wk) in zip(streams, weights):
        q = F.rms_norm(q.transpose(1, 2).contiguous(), (q.shape[-1],), wq, eps)
        k = F.rms_norm(k.transpose(1, 2).contiguous(), (k.shape[-1],), wk, eps)
        normed.append((q, k, v.transpose(1, 2)))
    q, k, v = (torch.cat(parts, dim=2) for parts in zip(*normed))
    if pe is not None:
        q, k = comfy_rope(q, pe), comfy_rope(k, pe)
    return q, k, v


@pytest.mark.parametrize("pe_batch", [1, 2, None])
@pytest.mark.parametrize("with_weights", [True, False])
def test_two_streams_written_into_the_joint_sequence_as_comfyuis_ops_compute_it(pe_batch, with_weights, gen):
    b, h, d, n_txt, n_img = 2, 3, 16, 5, 7
    streams = [stream(b, n_txt, h, d, gen), stream(b, n_img, h, d, gen)]
    weights = [tuple((1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16) if with_weights else None
                     for _ in range(2)) for _ in streams]
    pe = None if pe_batch is None else rotation_matrices(pe_batch, n_txt + n_img, d, gen)
    eps = torch.finfo(torch.float32).eps  # what torch's RMSNorm(eps=None) uses on bf16 inputs (computed in float32)
    out = tuple(torch.full((b, h, n_txt + n_img, d), float("nan"), dtype=torch.bfloat16) for _ in range(3))
    offset = 0
    for (q, k, v), (wq, wk) in zip(streams, weights):
        assert qk_norm_rope(q, k, v, wq, wk, eps, eps, pe, out, offset) is out
        offset += q.shape[1]
    expected = reference(streams, weights, eps, pe)
    for got, want in zip(out, expected):
        assert got.dtype == torch.bfloat16 and not got.isnan().any()
        assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()  # an ulp at most
        assert (got == want).float().mean() > 0.99


def test_without_out_one_stream_comes_back_in_head_layout(gen):
    q, k, v = stream(1, 6, 2, 8, gen)
    pe = rotation_matrices(1, 6, 8, gen)
    got = qk_norm_rope(q, k, v, None, None, 1e-6, 1e-6, pe)
    want = reference([(q, k, v)], [(None, None)], 1e-6, pe)
    assert all(g.shape == (1, 2, 6, 8) and g.is_contiguous() for g in got)
    assert torch.equal(got[2], want[2])
    assert torch.allclose(got[0].float(), want[0].float(), atol=2e-2)


def test_bad_arguments_are_refused_with_what_was_expected(gen):
    q, k, v = stream(1, 4, 2, 8, gen)
    with pytest.raises(ValueError, match="one shape and dtype"):
        qk_norm_rope(q, k[:, :3], v, None, None, 1e-6, 1e-6, None)
    with pytest.raises(ValueError, match=r"q_weight must be \[8\]"):
        qk_norm_rope(q, k, v, torch.ones(4), None, 1e-6, 1e-6, None)
    with pytest.raises(ValueError, match="is not float32"):
        qk_norm_rope(q, k, v, None, None, 1e-6, 1e-6, rotation_matrices(1, 3, 8, gen))  # 3 positions for 4 tokens
    with pytest.raises(ValueError, match="buffers holding rows 2..6"):
        out = tuple(torch.empty(1, 2, 5, 8, dtype=torch.bfloat16) for _ in range(3))
        qk_norm_rope(q, k, v, None, None, 1e-6, 1e-6, None, out, offset=2)


def test_rope_fits_only_comfyuis_rotation_matrices(gen):
    pe = rotation_matrices(2, 10, 8, gen)
    assert rope_fits(pe, 2, 10, 8) and rope_fits(pe[:1], 2, 9, 8)
    assert not rope_fits(pe, 3, 10, 8)  # another batch size
    assert not rope_fits(pe, 2, 11, 8)  # too few positions
    assert not rope_fits(pe.to(torch.bfloat16), 2, 10, 8)
    assert not rope_fits(pe[..., 0], 2, 10, 8)  # another layout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["flux", "qwen"])
def test_the_kernel_at_flux_and_qwen_sizes_on_gpu(layout, gen):
    """24 heads of 128, a 256-token text stream and a 1024-token image stream written into one joint sequence:
    Flux hands in views of one qkv projection, Qwen-Image three separate projections."""
    b, h, d, lengths = 1, 24, 128, (256, 1024)
    if layout == "flux":
        streams = [stream(b, n, h, d, gen) for n in lengths]
    else:
        streams = [tuple(torch.randn(b, n, h, d, generator=gen).to(torch.bfloat16) for _ in range(3))
                   for n in lengths]
    weights = [tuple((1 + 0.1 * torch.randn(d, generator=gen)).to(torch.bfloat16) for _ in range(2)) for _ in lengths]
    pe = rotation_matrices(b, sum(lengths), d, gen)
    eps = torch.finfo(torch.float32).eps
    out = tuple(torch.full((b, h, sum(lengths), d), float("nan"), dtype=torch.bfloat16, device="cuda")
                for _ in range(3))
    offset = 0
    for (q, k, v), (wq, wk) in zip(streams, weights):
        qk_norm_rope(q.cuda(), k.cuda(), v.cuda(), wq.cuda(), wk.cuda(), eps, eps, pe.cuda(), out, offset)
        offset += q.shape[1]
    for got, want in zip(out, reference(streams, weights, eps, pe)):
        got = got.cpu()
        assert not got.isnan().any()
        assert (got == want).float().mean() > 0.99  # rounding to nearest as torch: equal but for a few values
        assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


@pytest.mark.parametrize("rope,weights", [(True, True), (False, False)])
def test_the_kernel_compiles_for_hopper_without_spills(rope, weights, tmp_path):
    """Triton compiles the kernel for sm90 here, without a GPU (what the fused Flux blocks run on an H100/H200)."""
    triton = pytest.importorskip("triton")
    from comfyui_headroom.kernels import triton_attention_inputs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from testutil import ptxas_spills

    fn = triton_attention_inputs._qk_norm_rope_kernel
    bf16, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    args = [bf16] * 5 + [f32] + [bf16] * 3 + [4352, 24, 0, 1e-6, 1e-6] + [1 << 20] * 14
    constexprs = dict(D=128, BLOCK_H=8, HAS_Q_WEIGHT=weights, HAS_K_WEIGHT=weights, HAS_ROPE=rope)
    signature = {name: mangle_type(arg) for name, arg in zip(fn.arg_names, args)}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = compiled.asm["ptx"]
    assert "ld.global" in ptx and "st.global" in ptx
    spills = ptxas_spills(ptx, tmp_path)
    assert spills in (None, 0), f"the kernel spills {spills} bytes of registers"
