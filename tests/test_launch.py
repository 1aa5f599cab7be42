"""kernels/launch.py: the direct-launch cache key and its fall-backs.

The key must separate every case Triton compiles separately (else a kernel compiled for aligned
pointers or 32-bit sizes would run on other arguments); the GPU half of these tests (test_kernels_gpu.py)
checks that direct launches give bit-identical results to JITFunction.run.
"""

import pytest
import torch

pytest.importorskip("triton")

from comfyui_headroom.kernels.launch import CachedLauncher, specialization  # noqa: E402


def test_key_separates_alignment_and_dtype():
    base = torch.zeros(64, dtype=torch.int8)
    assert base.data_ptr() % 16 == 0  # torch's allocators align to at least 64 bytes
    assert specialization((base[0:16],)) != specialization((base[1:17],))
    assert specialization((base[0:16],)) == specialization((base[16:32],))
    assert specialization((torch.zeros(4, dtype=torch.bfloat16),)) != specialization((torch.zeros(4, dtype=torch.float16),))
    # same dtype, both aligned, other values: one key (that is the point of the cache)
    a, b = torch.zeros(256, dtype=torch.int8), torch.ones(512, dtype=torch.int8)
    assert specialization((a, 3072)) == specialization((b, 3072))


@pytest.mark.parametrize("x,y", [(1, 2), (16, 17), (3072, 3073), (2 ** 31 - 16, 2 ** 31), (5, -5), (True, False)])
def test_key_separates_int_classes(x, y):
    assert specialization((x,)) != specialization((y,))


def test_ints_and_floats_are_keyed_by_value():
    # finer than Triton (which would merge 3072 and 5120: both multiples of 16, 32-bit), never coarser
    assert specialization((3072,)) != specialization((5120,))
    assert specialization((3072,)) == specialization((3072,))
    assert specialization((0.5,)) != specialization((2.0,))
    assert specialization((1,)) != specialization((True,))  # bools are not ints here


def test_interpreted_kernels_take_the_normal_path():
    class InterpretedFunction:  # what triton.jit returns under TRITON_INTERPRET=1
        constexprs = [1]
        arg_names = ["x", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *a, **k: ("ran", grid, a, k)

    launcher = CachedLauncher(InterpretedFunction())
    assert not launcher.fast
    assert launcher((2,), 7, BLOCK=4) == ("ran", (2,), (7,), {"BLOCK": 4})
    assert launcher.fast_calls == 0


def test_constexprs_must_follow_runtime_parameters():
    class JITFunction:
        __name__ = "bad_kernel"
        constexprs = [0]
        arg_names = ["BLOCK", "x"]

    with pytest.raises(TypeError, match="bad_kernel"):
        CachedLauncher(JITFunction())


def test_empty_hook_chains_do_not_count_as_hooks():
    from comfyui_headroom.kernels.launch import _hook_active

    class HookChain:  # Triton 3.4+: always present, empty unless a profiler adds a hook
        def __init__(self, calls):
            self.calls = calls

    assert not _hook_active(None)  # Triton < 3.4 without hooks
    assert not _hook_active(HookChain([]))
    assert _hook_active(HookChain([print]))
    assert _hook_active(print)  # an old-style plain hook
