"""Choose the INT8 kernel for one call, run it, and count what ran.

Order of authority: :func:`force_kernel` (Python, e.g. a ComfyUI node's ``compute`` input) >
``HEADROOM_FORCE_KERNEL`` (env) > the automatic choice:

* CPU (no interpreter) -> ``reference``;
* CUDA with Triton: M <= ``SMALL_M`` -> ``triton_w8a16`` (memory bound: read int8, not bf16);
  Ampere/Ada (sm80/86/89), row/tensor-wise scales -> ``int_mm`` (cuBLAS INT8 is ~2x fp16 there);
  everything else from sm80 on (Hopper, Blackwell, block scales) -> ``triton_w8a8``;
  sm75 (Turing): W8A16 at small M, else ``reference`` (Triton has no int8 MMA there);
* CUDA without Triton -> ``int_mm`` where its shape limits allow, else ``reference``.

A forced kernel that cannot run this call (no Triton, CPU without ``TRITON_INTERPRET=1``, block scales
on ``int_mm``) falls back to the automatic choice, logged once; the stats name what really ran.

The choice, the stats, the logging (``HEADROOM_LOG_KERNEL=1``) and the NaN/inf check
(``HEADROOM_DEBUG=1``) all happen at run time inside the ``headroom::int8_linear`` custom op, so
``torch.compile`` sees one opaque call and never breaks the graph on them.

Per-call cost: this runs once per INT8 layer per step, so the host side is kept small (a 24-block
model issues ~200 of these per step and was CPU bound). Repeated calls with the same signature on the Hopper
W8A8 path skip all of this through launch plans (:mod:`.plans`). The ``HEADROOM_*`` variables are read once, at
import; call :func:`reload_env` after changing them in a running process. Per-device facts (Triton
usable, architecture family) are cached per ``torch.device``.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import threading
import types

import torch

from .backends import BACKENDS, BACKENDS_INT8_INPUT, KERNELS, check_args, check_layer_device, int_mm_supports
from .configs import arch_of, capability
from .support import HAS_TRITON, KernelUnsupported, interpreting

log = logging.getLogger("comfyui_headroom.kernels")

# At or below: the weight-only path. Measured on H100 (docs/PERFORMANCE.md, "## Kernels"): W8A16 beats
# W8A8 (quantization included) at M = 1 and 16 on every shape, and loses to it by 1.5-3x at M = 256.
SMALL_M = 16
ALIASES = {"triton": "triton_w8a8", "w8a8": "triton_w8a8", "w8a16": "triton_w8a16", "auto": None, "": None}
# The names a user picks a kernel by (a node's ``compute`` input, ``HEADROOM_FORCE_KERNEL``): "auto" = the dispatcher.
COMPUTE_CHOICES = ("auto", "triton", "int_mm", "w8a16", "reference")


def _shared_state() -> types.ModuleType:
    """One state per process, even if this package is imported under two names (ComfyUI + pip)."""
    state = sys.modules.get("_comfyui_headroom_kernel_state")
    if state is None:
        state = types.ModuleType("_comfyui_headroom_kernel_state")
        state.stats = collections.Counter()
        state.lock = threading.Lock()
        state.forced = None
        state.logged = set()
        sys.modules[state.__name__] = state
    if not hasattr(state, "env"):
        state.env = _read_env()
    return state


def _read_env() -> types.SimpleNamespace:
    """The ``HEADROOM_*`` switches, read once (``os.environ`` lookups cost ~1 us each, per layer per step).

    An unknown ``HEADROOM_FORCE_KERNEL`` must not make every import of the package fail (ComfyUI would not
    load the node pack, no CLI command would start): it is ignored, :func:`env_problem` says why (``headroom
    kernels`` reports it as an error) and the first kernel choice on a device logs it as a warning."""
    problem = None
    try:
        forced = normalise_kernel_name(os.environ.get("HEADROOM_FORCE_KERNEL"))
    except ValueError as err:
        forced = None
        problem = f"HEADROOM_FORCE_KERNEL={os.environ.get('HEADROOM_FORCE_KERNEL')!r}: {err}"
    return types.SimpleNamespace(
        forced=forced,
        problem=problem,
        log=os.environ.get("HEADROOM_LOG_KERNEL", "0") == "1",
        debug=os.environ.get("HEADROOM_DEBUG", "0") == "1",
    )


def normalise_kernel_name(name: str | None) -> str | None:
    """``"triton"``/``"w8a8"`` -> ``"triton_w8a8"``, ``"w8a16"`` -> ``"triton_w8a16"``, ``"auto"``/None -> None."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    if key in KERNELS:
        return key
    raise ValueError(
        f"unknown INT8 kernel {name!r}; choose one of {', '.join(COMPUTE_CHOICES)} (triton = w8a8)"
    )


_state = _shared_state()
# Per torch.device: (Triton can run there, architecture family). Devices do not change capability.
_device_facts: dict = {}


def reload_env() -> None:
    """Re-read ``HEADROOM_FORCE_KERNEL``, ``HEADROOM_LOG_KERNEL``, ``HEADROOM_DEBUG``, ``HEADROOM_FAST_LAUNCH``,
    ``HEADROOM_GLUON`` and ``TRITON_INTERPRET`` (they are read once at import; call this after changing them at
    run time)."""
    from . import configs, launch, support

    support.reload_env()
    configs.set_gluon(os.environ.get("HEADROOM_GLUON", "1") != "0")
    _plans.clear()
    launch.set_fast_launch(os.environ.get("HEADROOM_FAST_LAUNCH", "1") != "0")
    _device_facts.clear()
    _state.env = _read_env()


class force_kernel:
    """Force one kernel for every INT8 linear: ``force_kernel("w8a16")`` as a setter, or
    ``with force_kernel("reference"): ...`` to restore the previous choice afterwards.
    ``force_kernel(None)`` / ``force_kernel("auto")`` returns to the automatic choice."""

    def __init__(self, name: str | None) -> None:
        self.name = normalise_kernel_name(name)
        self._previous = _state.forced
        _state.forced = self.name

    def __enter__(self) -> "force_kernel":
        return self

    def __exit__(self, *exc) -> None:
        _state.forced = self._previous


def env_problem() -> str | None:
    """Why a ``HEADROOM_*`` variable was ignored (an unknown ``HEADROOM_FORCE_KERNEL``), else None."""
    return getattr(_state.env, "problem", None)


_DEVICE_TEXT = re.compile(r"(cpu)|cuda(?::([0-9]+))?|([0-9]+)")


def check_device(text, device_count: int | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"N"`` -> the ``torch.device``; ValueError naming the text and what
    this machine has when it is anything else (``npu:0``, ``cuda:x``) or a GPU that is not there.
    ``device_count``: the CUDA GPUs present (default: torch's count, 0 without CUDA)."""
    if device_count is None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    present = (f"{device_count} CUDA GPU(s) present: cuda:0..cuda:{device_count - 1}" if device_count else
               "no CUDA GPU is present" + ("; this torch is built without CUDA" if torch.version.cuda is None else ""))
    match = _DEVICE_TEXT.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a device headroom runs on: write cpu, cuda or cuda:N ({present})")
    if match.group(1):
        return torch.device("cpu")
    index = match.group(2) or match.group(3)
    name = f"cuda:{int(index)}" if index is not None else "cuda"
    if device_count == 0 or (index is not None and int(index) >= device_count):
        raise ValueError(f"{name} does not exist ({present}); use cpu" if device_count == 0 else
                         f"{name} does not exist ({present})")
    if index is None:  # "cuda": the current GPU of a machine that has one, else (a count given for tests) cuda:0
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cuda", int(index))


def forced_kernel() -> str | None:
    """The kernel forced through Python, else through ``HEADROOM_FORCE_KERNEL``, else None (auto)."""
    forced = _state.forced
    return forced if forced is not None else _state.env.forced


def _facts(device: torch.device) -> tuple[bool, str]:
    """(Triton runs on this device, its architecture family), computed once per device."""
    facts = _device_facts.get(device)
    if facts is None:
        if not HAS_TRITON:
            runs = False
        elif device.type == "cuda":
            runs = capability(device) >= (7, 5)
        else:
            runs = device.type == "cpu" and interpreting()
        facts = _device_facts[device] = (runs, arch_of(device) if device.type == "cuda" else device.type)
        if env_problem():
            log_once(("env", env_problem()), f"headroom: {env_problem()}; ignored (the automatic choice applies)",
                     logging.WARNING)
    return facts


def _triton_runs_on(device: torch.device) -> bool:
    return _facts(device)[0]


def can_run(name: str, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    if name == "reference":
        return True
    if name == "int_mm":
        return x.device.type in ("cuda", "cpu") and int_mm_supports(x, weight, weight_scale)
    return _triton_runs_on(x.device)


# Why the automatic choice picked a kernel (``headroom kernels`` prints these; constants: no cost per call).
WHY_NOT_CUDA = "not a CUDA device: dequantize + matmul (the reference) runs here"
WHY_NO_TRITON_INT_MM = "Triton cannot run on this GPU (not installed, or older than sm75); cuBLAS _int_mm takes this shape"
WHY_NO_TRITON_REFERENCE = ("Triton cannot run on this GPU and _int_mm cannot take this shape (M <= 16, K or N not a "
                           "multiple of 8, or block scales): dequantize + matmul")
WHY_SMALL_M = (f"M <= {SMALL_M}: memory bound, so the weight-only kernel (reads the int8 weight, no activation "
               "quantization)")
WHY_AMPERE_INT_MM = "Ampere/Ada with row/tensor-wise scales: cuBLAS INT8 is about 2x fp16 there"
WHY_TURING = "sm75 (Turing): Triton has no int8 MMA there; dequantize + fp16 matmul"
WHY_W8A8_BLOCK = "Ampere/Ada, but _int_mm cannot take this (block scales or shape): the Triton W8A8 kernel"
WHY_W8A8 = "sm90 and newer: cuBLAS INT8 is only about bf16 speed there, the Triton W8A8 kernel is faster"


def auto_choice(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[str, str]:
    """``(kernel, why)``: the automatic choice for this call and the reason (one of the ``WHY_*`` texts)."""
    device = x.device
    if device.type != "cuda":
        return "reference", WHY_NOT_CUDA
    triton_runs, arch = _facts(device)
    if not triton_runs:
        if int_mm_supports(x, weight, weight_scale):
            return "int_mm", WHY_NO_TRITON_INT_MM
        return "reference", WHY_NO_TRITON_REFERENCE
    m = x.numel() // max(x.shape[-1], 1)
    if m <= SMALL_M:
        return "triton_w8a16", WHY_SMALL_M
    if arch in ("sm80", "sm86", "sm89"):
        if int_mm_supports(x, weight, weight_scale):
            return "int_mm", WHY_AMPERE_INT_MM
        return "triton_w8a8", WHY_W8A8_BLOCK
    if arch == "fallback":  # sm75: no Triton int8 MMA; dequantize + fp16 matmul
        return "reference", WHY_TURING
    return "triton_w8a8", WHY_W8A8


def auto_kernel(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> str:
    return auto_choice(x, weight, weight_scale)[0]


def explain_kernel(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[str, str]:
    """``(kernel, why)`` for this call: what :func:`choose_kernel` picks, and why (forced, or the automatic rule)."""
    forced = forced_kernel()
    if forced is None:
        return auto_choice(x, weight, weight_scale)
    source = "force_kernel()" if _state.forced is not None else "HEADROOM_FORCE_KERNEL"
    if can_run(forced, x, weight, weight_scale):
        return forced, f"forced by {source}"
    kernel, why = auto_choice(x, weight, weight_scale)
    return kernel, f"{forced} is forced by {source} but cannot run this call here; automatic choice: {why}"


def choose_kernel(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> str:
    """The kernel this call will use (forced if possible, else automatic)."""
    forced = _state.forced
    if forced is None:
        forced = _state.env.forced
    if forced is not None:
        if can_run(forced, x, weight, weight_scale):
            return forced
        chosen = auto_kernel(x, weight, weight_scale)
        log_once(("fallback", forced, chosen, x.device.type),
                  f"INT8 kernel {forced!r} was forced but cannot run here ({x.device}, x {tuple(x.shape)}, "
                  f"weight {tuple(weight.shape)}, scale {tuple(weight_scale.shape)}); using {chosen!r}",
                  logging.WARNING)
        return chosen
    return auto_kernel(x, weight, weight_scale)


def choose_kernel_while_tracing(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> str:
    """:func:`choose_kernel` for code that ``torch.compile`` traces, without a graph break.

    Why: :func:`choose_kernel` reads per-device caches, the GPU's capability and logs, which dynamo does not
    trace. Here the traced part only gathers the call's static facts (device, rows, weight and scale shapes, the
    forced kernel); :func:`_choice_from_facts` turns them into the answer once, while tracing, and dynamo's guards
    on those facts recompile when one changes. The choice depends on M only through ``M <= SMALL_M`` (W8A16) and
    ``_int_mm``'s ``M > 16``, so every M above both is one stand-in: a symbolic M (dynamic shapes) becomes one guard,
    not a recompilation per token count.
    """
    m = x.numel() // x.shape[-1]
    above_thresholds = max(SMALL_M, 16) + 1
    m = above_thresholds if m >= above_thresholds else int(m)
    return _choice_from_facts(x.device, m, tuple(int(d) for d in weight.shape),
                              tuple(int(d) for d in weight_scale.shape), forced_kernel())


@torch.compiler.assume_constant_result
def _choice_from_facts(device: torch.device, m: int, weight_shape: tuple, scale_shape: tuple,
                       forced: str | None) -> str:
    """:func:`choose_kernel` on stand-ins of one element each (zero strides) on ``device``; ``forced`` is the
    state :func:`choose_kernel` reads itself, an argument so that dynamo guards on it."""
    n, k = weight_shape
    x = torch.empty_strided((m, k), (0, 0), dtype=torch.int8, device=device)
    weight = torch.empty_strided((n, k), (0, 0), dtype=torch.int8, device=device)
    weight_scale = torch.empty_strided(scale_shape, (0,) * len(scale_shape), dtype=torch.float32, device=device)
    return choose_kernel(x, weight, weight_scale)


def log_once(key, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process (kernel choices repeat every step)."""
    with _state.lock:
        if key in _state.logged:
            return
        _state.logged.add(key)
    log.log(level, message)


def record_call(kernel: str, m: int, n: int, k: int) -> None:
    """Count one call of ``kernel`` on an ``[m, k] @ [n, k]`` product in :func:`kernel_summary` (fused paths
    outside :func:`run_kernel`, such as the rotate+quantize one, count themselves here)."""
    with _state.lock:
        _state.stats[(kernel, m, n, k)] += 1


def kernel_summary() -> dict:
    """``{kernel: {"calls": n, "shapes": {"MxNxK": calls}}}`` since the last reset."""
    summary: dict = {}
    with _state.lock:
        for (kernel, m, n, k), calls in sorted(_state.stats.items()):
            entry = summary.setdefault(kernel, {"calls": 0, "shapes": {}})
            entry["calls"] += calls
            entry["shapes"][f"{m}x{n}x{k}"] = calls
    return summary


def reset_kernel_stats() -> None:
    with _state.lock:
        _state.stats.clear()


def run_kernel(name: str, x, weight, weight_scale, bias, block_size: int) -> torch.Tensor:
    """Run one backend with the bookkeeping: stats, optional log line, optional NaN/inf check."""
    return _run(BACKENDS, name, (x, weight, weight_scale, bias, block_size), x, weight, weight_scale, bias)


def run_kernel_int8_input(name: str, qa, a_scale, weight, weight_scale, bias, out_dtype: torch.dtype,
                          block_size: int) -> torch.Tensor:
    """:func:`run_kernel` for an activation that is already INT8 (``qa [M, K]`` with per-row ``a_scale``, made by
    a producer of :mod:`.producers`): the GEMM part of backend ``name`` (``triton_w8a8``, ``int_mm``, ``reference``)."""
    return _run(BACKENDS_INT8_INPUT, name, (qa, a_scale, weight, weight_scale, bias, out_dtype, block_size),
                qa, weight, weight_scale, bias)


def _run(backends: dict, name: str, args: tuple, x, weight, weight_scale, bias) -> torch.Tensor:
    """``backends[name](*args)``, falling back to reference when the kernel refuses; stats, log, NaN check."""
    n, k = weight.shape
    m = x.numel() // max(k, 1)
    try:
        y = backends[name](*args)
    except KernelUnsupported as why:
        log_once(("unsupported", name, str(why)), f"INT8 kernel {name!r} skipped: {why}; using 'reference'")
        name = "reference"
        y = backends[name](*args)
    record_call(name, m, n, k)
    env = _state.env
    if env.log:
        log_once(("shape", name, m, n, k), f"INT8 kernel {name}: x [{m}, {k}] @ W [{n}, {k}] -> {y.dtype}")
    if env.debug and not bool(torch.isfinite(y).all()):
        cause = ("its input already had NaN/inf" if x.is_floating_point() and not bool(torch.isfinite(x).all())
                 else "the input was finite")
        raise FloatingPointError(
            f"INT8 kernel {name} produced NaN/inf for x {tuple(x.shape)} {x.dtype} @ int8 W {tuple(weight.shape)} "
            f"(scale {tuple(weight_scale.shape)}, bias {'yes' if bias is not None else 'no'}); {cause}"
        )
    return y


def dispatch_and_run(x, weight, weight_scale, bias, block_size: int) -> torch.Tensor:
    check_args(x, weight, weight_scale, bias, block_size)
    return run_kernel(choose_kernel(x, weight, weight_scale), x, weight, weight_scale, bias, block_size)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for an int8 ``W [N, K]`` with its float32 scale; output in ``x.dtype``.

    Eager inference calls go straight to the chosen backend; under ``torch.compile``, or when ``x``
    needs a gradient, the call is the custom op ``torch.ops.headroom.int8_linear`` (registered by
    :mod:`.ops`), which does the same at run time and has an autograd formula.
    """
    if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
        return torch.ops.headroom.int8_linear(x, weight, weight_scale, bias, block_size)
    if x.is_cuda and _plans_allowed():
        return _planned(x, weight, weight_scale, bias, block_size)
    return dispatch_and_run(x, weight, weight_scale, bias, block_size)


# Launch plans (see .plans): per call signature, a LinearPlan or _NO_PLAN (the normal path every time).
_plans: dict = {}
_NO_PLAN = object()
_plans_module = None


def _plans_allowed() -> bool:
    """Plans only replace the automatic choice, without logging or NaN checks, with direct launches on."""
    global _plans_module
    env = _state.env
    if _state.forced is not None or env.forced is not None or env.log or env.debug or not HAS_TRITON:
        return False
    if _plans_module is None:
        from . import plans

        _plans_module = plans
    return _plans_module.usable()


def _planned(x, weight, weight_scale, bias, block_size: int) -> torch.Tensor:
    plans = _plans_module
    return _through_plan(
        plans.signature(x, weight, weight_scale, bias, block_size),
        lambda: dispatch_and_run(x, weight, weight_scale, bias, block_size),
        lambda: (plans.build(x, weight, weight_scale, bias)
                 if auto_kernel(x, weight, weight_scale) == "triton_w8a8" else None),
        lambda plan: plan.run(x, weight, weight_scale, bias))


def int8_linear_int8_input(qa: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None, out_dtype: torch.dtype, block_size: int = 128) -> torch.Tensor:
    """:func:`int8_linear` for an activation that is already INT8 (``qa int8 [M, K]``, per-row ``a_scale``), as
    fused producers (:mod:`.producers`) write it: the GEMM of the kernel the automatic (or forced) choice names
    (``triton_w8a8``, ``int_mm``; anything else computes it with the reference). Planned like :func:`int8_linear`;
    under ``torch.compile`` the custom op ``torch.ops.headroom.int8_linear_int8_input`` (:mod:`.ops`), which runs
    :func:`int8_linear_int8_input_eager` at run time."""
    if torch.compiler.is_compiling():
        return torch.ops.headroom.int8_linear_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype,
                                                         block_size)
    return int8_linear_int8_input_eager(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size)


def int8_linear_int8_input_eager(qa: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor,
                                 weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                                 block_size: int = 128) -> torch.Tensor:
    if qa.is_cuda and _plans_allowed():
        return _planned_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size)
    return _int8_input_normal(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size)


def _planned_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size) -> torch.Tensor:
    plans = _plans_module
    return _through_plan(
        plans.signature_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size),
        lambda: _int8_input_normal(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size),
        lambda: (plans.build_int8_input(qa, a_scale, weight, weight_scale, bias, out_dtype)
                 if auto_kernel(qa, weight, weight_scale) == "triton_w8a8" else None),
        lambda plan: plan.run_int8(qa, a_scale, weight, weight_scale, bias, out_dtype))


def check_int8_rows(qa: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor) -> None:
    """ValueError unless ``qa``/``a_scale`` are INT8 rows ``[M, K]`` and their ``[M]`` scales for ``weight [N, K]``
    (the real GEMM on producer rows and its fake under ``torch.compile`` check the same)."""
    if qa.dtype != torch.int8 or qa.ndim != 2 or qa.shape[1] != weight.shape[1] or a_scale.shape != qa.shape[:1]:
        raise ValueError(f"int8_linear_int8_input: expected int8 rows [M, {weight.shape[1]}] and float32 scales "
                         f"[M] for the int8 weight {tuple(weight.shape)}, got {qa.dtype} {tuple(qa.shape)} and "
                         f"{tuple(a_scale.shape)}")


def _int8_input_normal(qa, a_scale, weight, weight_scale, bias, out_dtype, block_size) -> torch.Tensor:
    check_int8_rows(qa, a_scale, weight)
    if a_scale.device != qa.device:
        raise ValueError(f"int8_linear_int8_input: INT8 rows on {qa.device} but their scales on {a_scale.device}")
    check_layer_device("int8_linear_int8_input", qa.device, weight, weight_scale, bias)
    kernel = choose_kernel(qa, weight, weight_scale)
    if kernel not in BACKENDS_INT8_INPUT:  # e.g. the weight-only kernel at small M, which wants float input
        kernel = "reference"
    return run_kernel_int8_input(kernel, qa, a_scale, weight, weight_scale, bias, out_dtype, block_size)


def _through_plan(key, normal, build, run_plan) -> torch.Tensor:
    """The first call of a signature runs ``normal()`` and then ``build()``s its plan (None: this signature always
    takes the normal path); later calls run the plan. A plan whose direct launch this Triton rejects switches
    plans and direct launches off and runs the normal path."""
    plan = _plans.get(key)
    if plan is None:
        y = normal()
        if len(_plans) >= _plans_module.MAX_PLANS:
            _plans.clear()
        built = build()
        _plans[key] = built if built is not None else _NO_PLAN
        return y
    if plan is _NO_PLAN:
        return normal()
    try:
        y = run_plan(plan)
    except TypeError as err:  # this Triton's launcher rejects direct launches: plans and direct launches stop
        from .launch import _disable

        _disable(f"launch plan: {err}")
        _plans.clear()
        return normal()
    record_call("triton_w8a8", plan.m, plan.n, plan.k)
    return y
