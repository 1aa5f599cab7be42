"""The Gluon W8A8 kernel (kernels/gluon_w8a8.py) compiles for sm90 on any machine, no GPU needed.

Gluon has no interpreter, so CI cannot run the kernel; it compiles it for an H100 with the installed triton
(CI's differs from the device's), which catches Gluon API changes between triton versions, and checks the
compiled code: int8 wgmma, TMA copies, register reallocation between the warp roles, no register spills.
Its numbers are checked on the GPU (tests/test_kernels_gpu.py). Dispatch rules are tested here too.
"""

import re

import pytest
import torch
from comfyui_headroom.kernels import gluon_w8a8
from testutil import ptxas_spills

pytestmark = pytest.mark.skipif(not gluon_w8a8.HAVE_GLUON, reason="this triton has no Gluon")


def _compile_for_sm90(m, n, k, out_dtype=torch.bfloat16, scale="rowwise", bias=True, tile=0):
    import triton
    from comfyui_headroom.kernels.configs import W8A8_WS_CONFIGS
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    cfg = W8A8_WS_CONFIGS["sm90"][tile]
    qa, w = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    out = torch.empty(m, n, dtype=out_dtype)
    ws = torch.ones(n) if scale == "rowwise" else torch.ones(1)
    b = torch.zeros(n, dtype=out_dtype) if bias else None
    grid, args, constexprs = gluon_w8a8.kernel_args(qa, torch.ones(m), w, ws, b, out, cfg.block_n, cfg.block_k,
                                                    cfg.num_stages, cfg.group_m, num_sms=132)
    fn = gluon_w8a8._w8a8_ws_kernel
    signature = {name: mangle_type(arg) for name, arg in zip(fn.arg_names, args)}
    signature.update({name: "constexpr" for name in fn.arg_names[len(args):]})
    source = GluonASTSource(fn, signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 128),
                              options=dict(num_warps=4, maxnreg=gluon_w8a8.LAUNCH_REGS))
    return grid, compiled


@pytest.mark.parametrize("out_dtype,scale,bias,tile", [(torch.bfloat16, "rowwise", True, 0),
                                                       (torch.float16, "tensorwise", False, 0),
                                                       (torch.bfloat16, "rowwise", True, 1)])
def test_compiles_for_sm90_with_int8_wgmma_and_no_spills(out_dtype, scale, bias, tile, tmp_path):
    grid, compiled = _compile_for_sm90(4096, 3072, 3072, out_dtype, scale, bias, tile)
    ptx = compiled.asm["ptx"]
    assert re.search(r"wgmma\.mma_async\S*\.s32\.s8\.s8", ptx), "no int8 wgmma in the PTX"
    assert "cp.async.bulk.tensor" in ptx, "no TMA copies in the PTX"
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx, "no register reallocation between warp roles"
    assert compiled.metadata.shared <= 232448, "more shared memory than an H100 block may have (227 KB)"
    assert grid == (132,)  # 32 x 12 (or 24) tiles over 132 SMs: persistent, one program per SM
    spills = ptxas_spills(ptx, tmp_path)
    if spills is not None:
        # ptxas 13 (triton 3.9) spills nothing; ptxas 12.8 (triton 3.6) ~48 bytes of epilogue addresses with a
        # bias. One spilled 64 x 128 accumulator would be 256 bytes per thread, in the main loop.
        assert spills < 256, f"the Gluon kernel spills {spills} bytes of registers"


def test_supports_only_its_formats():
    assert gluon_w8a8.supports(4096, 3072, 3072, torch.bfloat16, 1)
    assert gluon_w8a8.supports(4096, 3072, 3072, torch.float16, 0)
    assert not gluon_w8a8.supports(4096, 3072, 3072, torch.float32, 1)  # float32 C tile would not fit
    assert not gluon_w8a8.supports(4096, 3072, 3072, torch.bfloat16, 2)  # block scales: Triton kernel
    assert not gluon_w8a8.supports(4096, 3072, 3000, torch.bfloat16, 1)  # K % 16: TMA row stride
    assert not gluon_w8a8.supports(4096, 3070, 3072, torch.bfloat16, 1)  # N % 8: TMA row stride of C


def test_dispatch_picks_the_tile_with_the_fewest_waves(monkeypatch):
    """`_gluon_config` on a (pretend) 132-SM H100: the winners measured on the H100 for each shape
    (bench/results/gluon_small_m.json); the Triton kernels where the Gluon one cannot run."""
    from comfyui_headroom.kernels import configs, triton_w8a8

    monkeypatch.setattr(triton_w8a8, "arch_of", lambda device: "sm90")
    monkeypatch.setattr(triton_w8a8, "_sm_count", lambda device: 132)
    dev = torch.device("cpu")
    wide, narrow = configs.W8A8_WS_CONFIGS["sm90"]

    def choice(m, n, k, out_dtype=torch.bfloat16, mode=1):
        out = torch.empty(1, dtype=out_dtype)
        return triton_w8a8._gluon_config(dev, m, n, k, out, mode, (torch.empty(16, dtype=torch.int8),))

    assert choice(4096, 3072, 3072) == wide    # 384 wide tiles: 3 full waves
    assert choice(4096, 13824, 5120) == wide
    assert choice(2048, 3072, 3072) == narrow  # 192 wide tiles = 1.45 waves; 384 narrow = 2.9
    assert choice(2048, 12288, 3072) == wide
    assert choice(1024, 5120, 5120) == narrow
    assert choice(1024, 3072, 3072) == wide    # 96 wide tiles: one wave either way, the wide tile is faster
    assert choice(256, 3072, 3072) == narrow
    assert choice(4096, 3072, 3072, torch.float32) is None
    assert choice(4096, 3072, 3072, mode=2) is None
    configs.set_gluon(False)
    try:
        assert choice(4096, 3072, 3072) is None  # HEADROOM_GLUON=0
    finally:
        configs.set_gluon(True)
    unaligned = torch.empty(17, dtype=torch.int8)[1:]
    assert triton_w8a8._gluon_config(dev, 4096, 3072, 3072, torch.empty(1, dtype=torch.bfloat16), 1,
                                     (unaligned,)) is None


def test_a_failing_gluon_kernel_falls_back_to_the_triton_kernel(monkeypatch, caplog):
    """A triton whose Gluon cannot build our kernel: the call still computes (Triton kernel), a warning says so,
    and later calls skip the Gluon attempt."""
    from comfyui_headroom.kernels import configs, triton_w8a8

    def broken(*args, **kwargs):
        raise AttributeError("module 'triton.experimental.gluon.language' has no attribute 'warp_specialize'")

    launched = []

    def fake_pointer_launch(grid, qa, weight, out, *rest, **kwargs):  # stands in for the Triton kernel
        out.fill_(1.0)
        launched.append(grid)

    monkeypatch.setattr(gluon_w8a8, "w8a8_ws_matmul", broken)
    monkeypatch.setattr(triton_w8a8, "_launch_pointer", fake_pointer_launch)
    monkeypatch.setattr(triton_w8a8, "_gluon_config",
                        lambda *a: configs.W8A8_WS_CONFIGS["sm90"][0] if configs._GLUON_ENABLED else None)
    qa, qw = torch.zeros(64, 32, dtype=torch.int8), torch.zeros(48, 32, dtype=torch.int8)
    try:
        with caplog.at_level("WARNING", logger="comfyui_headroom.kernels"):
            out = triton_w8a8.w8a8_matmul(qa, torch.ones(64), qw, torch.ones(48), None, torch.bfloat16)
        assert launched and torch.equal(out, torch.ones(64, 48, dtype=torch.bfloat16))
        assert "Gluon W8A8 kernel failed (AttributeError" in caplog.text
        assert not configs._GLUON_ENABLED  # switched off for the process
    finally:
        configs.set_gluon(True)
