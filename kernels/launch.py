"""Launch our compiled Triton kernels without ``JITFunction.run``'s per-call argument binding.

Why: an INT8 layer launches two kernels (activation quantization, GEMM). On the H100 host,
``JITFunction.run`` - binding and specializing every argument, building the cache key, launch metadata -
was about half of an INT8 layer's 120-130 us of host time (docs/PERFORMANCE.md, "## Kernels"), against
~25 us for a whole bf16 ``F.linear``. A 24-block model issues ~100 such layers per step, so block
streaming and resident INT8 steps were CPU bound.

How: the first call with a given *specialization* goes through the normal ``fn[grid](...)`` (which
compiles or finds the kernel and launches it) and keeps the returned ``CompiledKernel``; later calls with
the same specialization call its launcher directly, as ``CompiledKernel.__getitem__``'s runner does.
Our key is at least as fine as Triton's own specialization, so the kept kernel is always one Triton
would have chosen: per tensor argument its dtype and whether its address is 16-byte aligned; every other
argument by value (Triton looks at ints only for ==1, %16 and 32/64-bit); every constexpr and launch
option; the current device. Anything unusual takes the normal path: the interpreter, launch hooks (profilers such
as proton), ``HEADROOM_FAST_LAUNCH=0``, or a launcher that rejects the call (checked once, then the fast path
is switched off for the process with a log line).
"""

from __future__ import annotations

import inspect
import logging
import os

import torch

log = logging.getLogger("comfyui_headroom.kernels")

_MAX_ENTRIES = 4096  # per kernel
_ENABLED = os.environ.get("HEADROOM_FAST_LAUNCH", "1") != "0"


def specialization(args) -> tuple:
    """The launch-cache key part that depends on the runtime arguments: per tensor its dtype and whether its
    address is 16-byte aligned, every other argument (ints, floats, None) by value. Finer than Triton's own
    specialization (which looks at ints only for ==1, %16 and 32/64-bit), so one key never covers two kernels
    Triton would compile; the price, one entry per distinct size, is small (a model has a handful of shapes).
    One comprehension, no per-argument function call: this runs twice per INT8 layer per step."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                  else _descriptor_key(a) if hasattr(a, "block_shape") else (type(a), a) for a in args])


def _descriptor_key(desc) -> tuple:
    """A host-side TMA descriptor (Gluon's ``TensorDescriptor``): Triton specializes on its dtype, block shape and
    layout; we also key on its shape, strides and the base address's alignment. Its address itself is not
    part of the key: the launcher encodes a fresh descriptor from the object on every call."""
    base = desc.base
    return (type(desc), base.dtype, not base.data_ptr() & 15, tuple(desc.shape), tuple(desc.strides),
            tuple(desc.block_shape), desc.layout, desc.padding)


def _hook_holder():
    """Where this Triton keeps its launch hooks: ``triton.knobs.runtime`` (3.4+) or ``CompiledKernel`` (older)."""
    try:
        from triton import knobs

        return knobs.runtime
    except (ImportError, AttributeError):
        from triton.compiler.compiler import CompiledKernel

        return CompiledKernel


def _hook_active(hook) -> bool:
    """Triton 3.4+ always holds a ``HookChain`` (empty unless a profiler adds to it); older ones hold None."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _launch_hooks_set(holder) -> bool:
    return _hook_active(getattr(holder, "launch_enter_hook", None)) or _hook_active(getattr(holder, "launch_exit_hook", None))


class CachedLauncher:
    """``launcher(grid, *runtime_args, CONSTEXPR=..., num_warps=..., num_stages=...)``: same meaning as
    ``fn[grid](*runtime_args, ...)``, returns the ``CompiledKernel``. The kernel's constexpr parameters must
    all come after its runtime parameters and must all be passed by keyword."""

    def __init__(self, fn):
        self.fn = fn
        # JITFunction or GluonJITFunction; not the interpreter's InterpretedFunction
        self.can_be_fast = type(fn).__name__ in ("JITFunction", "GluonJITFunction") and hasattr(fn, "constexprs")
        self.fast = _ENABLED and self.can_be_fast  # launchers made after set_fast_launch follow it too
        self._cache: dict = {}
        self.fast_calls = 0  # how many launches skipped JITFunction.run (tests read it)
        if self.can_be_fast:
            n_params = len(fn.arg_names)
            first = min(fn.constexprs, default=n_params)
            if sorted(fn.constexprs) != list(range(first, n_params)):
                raise TypeError(f"{fn.__name__}: constexpr parameters must follow every runtime parameter")
            python_fn = getattr(fn, "fn", None)  # the decorated function
            params = inspect.signature(python_fn).parameters.items() if python_fn is not None else ()
            defaults = [name for name, p in params if p.default is not inspect.Parameter.empty]
            if defaults:  # a call leaving one out would never be kept: it would silently take the slow path
                raise TypeError(f"{fn.__name__}: give {', '.join(defaults)} no default; callers pass every "
                                "constexpr by keyword")
            self.n_runtime = first
            self.constexpr_names = tuple(fn.arg_names[first:])
            from triton.runtime import driver

            self._driver = driver

    def _key(self, args, kwargs) -> tuple:
        return (torch.cuda.current_device(), tuple(kwargs.items()), specialization(args))

    def __call__(self, grid, *args, **kwargs):
        if not self.fast:
            return self.fn[grid](*args, **kwargs)
        key = self._key(args, kwargs)
        entry = self._cache.get(key)
        if entry is None or hooks_active():
            compiled = self.fn[grid](*args, **kwargs)
            if entry is None and len(args) == self.n_runtime and all(n in kwargs for n in self.constexpr_names):
                if len(self._cache) >= _MAX_ENTRIES:  # a process that saw very many shapes: start again
                    self._cache.clear()
                self._cache[key] = (compiled, tuple(kwargs[n] for n in self.constexpr_names))
            return compiled
        stream = self._driver.active.get_current_stream(key[0])
        try:
            launch_kept(entry, grid, stream, args)
        except TypeError as err:  # a Triton whose launcher takes other arguments: never try again
            _disable(f"{self.fn.__name__}: {err}")
            return self.fn[grid](*args, **kwargs)
        self.fast_calls += 1
        return entry[0]

    def lookup(self, args, kwargs):
        """The kept ``(CompiledKernel, constexpr values)`` a call with these arguments would launch, or None (not
        launched yet, or direct launches off). For launch plans (:mod:`.plans`), which then call
        :func:`launch_kept` themselves."""
        if not self.fast:
            return None
        return self._cache.get(self._key(args, kwargs))


def launch_kept(entry, grid, stream, args) -> None:
    """Launch a kept ``(CompiledKernel, constexprs)`` directly: what ``CompiledKernel.__getitem__``'s runner does.
    ``grid``: a tuple of 1-3 sizes. Raises TypeError where this Triton's launcher takes other arguments."""
    compiled, constexprs = entry
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *constexprs)


_holder = None


def hooks_active() -> bool:
    """A profiler has registered Triton launch hooks (then every launch must go through ``JITFunction.run``)."""
    global _holder
    if _holder is None:
        _holder = _hook_holder()
    return _launch_hooks_set(_holder)


def fast_launch_enabled() -> bool:
    return _ENABLED


_LAUNCHERS: list[CachedLauncher] = []


def cached_launcher(fn) -> CachedLauncher:
    launcher = CachedLauncher(fn)
    _LAUNCHERS.append(launcher)
    return launcher


def _disable(why: str) -> None:
    """A direct launch was rejected: every launcher, and the launch plans (which launch directly), stop."""
    log.warning("headroom: direct Triton launches switched off (%s); using JITFunction.run", why)
    set_fast_launch(False)


def set_fast_launch(enabled: bool) -> None:
    """Switch the direct launches on or off for every kernel (benchmarks compare both; tests check both)."""
    global _ENABLED
    _ENABLED = enabled
    for launcher in _LAUNCHERS:
        launcher.fast = enabled and launcher.can_be_fast
