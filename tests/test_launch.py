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


def test_constexprs_must_have_no_default():
    """A call leaving out a defaulted constexpr would never be kept: every launch would silently be slow."""
    def kernel(x, BLOCK, GELU=False):
        pass

    class JITFunction:
        __name__ = "defaulted_kernel"
        constexprs = [1, 2]
        arg_names = ["x", "BLOCK", "GELU"]
        fn = staticmethod(kernel)

    with pytest.raises(TypeError, match="defaulted_kernel: give GELU no default"):
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


class _Compiled:
    """Stands in for a CompiledKernel: records what its launcher is called with (or rejects it)."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, reject=False):
        self.reject, self.runs = reject, []

    def run(self, *args):
        if self.reject:
            raise TypeError("this launcher takes other arguments")
        self.runs.append(args)


class JITFunction:  # the class name is what CachedLauncher checks
    __name__ = "fake_kernel"
    constexprs = [1]
    arg_names = ["x", "BLOCK"]

    def __init__(self, compiled):
        self.compiled, self.normal_calls = compiled, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.normal_calls += 1
            return self.compiled

        return run


class _Driver:
    class active:
        @staticmethod
        def get_current_stream(device):
            return 42


def _fake_launcher(monkeypatch, compiled):
    from comfyui_headroom.kernels import launch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "_LAUNCHERS", list(launch._LAUNCHERS))  # registered for this test only
    launcher = launch.cached_launcher(JITFunction(compiled))
    launcher._driver = _Driver
    launch.set_fast_launch(True)
    return launcher


def test_the_first_call_is_kept_and_later_ones_launch_it_directly(monkeypatch):
    compiled = _Compiled()
    launcher = _fake_launcher(monkeypatch, compiled)
    assert launcher.lookup((7,), {"BLOCK": 4}) is None
    assert launcher((2,), 7, BLOCK=4) is compiled  # normal path: compiles (here: returns) and keeps it
    assert launcher.fn.normal_calls == 1 and launcher.lookup((7,), {"BLOCK": 4}) == (compiled, (4,))
    assert launcher((3, 2), 7, BLOCK=4) is compiled  # direct: grid, stream, metadata, runtime args, constexprs
    assert launcher.fn.normal_calls == 1 and launcher.fast_calls == 1
    assert compiled.runs == [(3, 2, 1, 42, "function", "metadata", None, None, None, 7, 4)]


def test_a_rejected_direct_launch_switches_direct_launches_off(monkeypatch):
    from comfyui_headroom.kernels import launch

    launcher = _fake_launcher(monkeypatch, _Compiled(reject=True))
    try:
        launcher((2,), 7, BLOCK=4)
        launcher((2,), 7, BLOCK=4)  # the direct launch raises TypeError: the normal path runs it instead
        assert launcher.fn.normal_calls == 2 and launcher.fast_calls == 0 and not launcher.fast
    finally:
        launch.set_fast_launch(True)
