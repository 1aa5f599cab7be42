"""Shims that let remote modeling code written for transformers 4.x (Tencent's HunyuanImage-3) run under 5.x.

Found by running Tencent's own code at a tiny size on a CPU under transformers 5.25 (docs/hunyuan3.md,
"transformers 5.x"): its module imports and the model builds unchanged; generation breaks in three places, each
bridged by one function below. Every shim is keyed on the API it bridges, not on a class name (our test fake
has the same API points under other names), marks what it changed (applying twice changes nothing) and does
nothing under transformers 4.x.

- :func:`prepare_transformers5_import` runs before the remote module is imported: names the remote code imports
  from transformers that a 5.x release no longer has are put back (none are missing in 5.25).
- :func:`apply_transformers5_shims` runs on the built model: the cache class and the generation hooks.
- :func:`transformers5_blockers` says what the shims cannot bridge; the loader refuses Tencent's code for it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import types

import torch
from torch import nn

log = logging.getLogger("comfyui_headroom")

SHIMMED = "_headroom_transformers5_shim"  # set on what a shim replaced: applying twice is a no-op
CHECKED_VERSIONS = "5.25"  # the 5.x release these shims were written against (Tencent's code ran under it)
SHIMMED_MAJOR = 5  # a later major version is refused: its API is unknown here


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# ------------------------------------------------------------------------------ before the import


def _identity_docstring_decorator(*docstr):
    """What ``add_start_docstrings(...)`` does for running code: nothing (it only edits ``__doc__``)."""

    def decorate(fn):
        return fn

    return decorate


def _flash_attn_2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _siglip2_image_processor():
    import transformers

    return transformers.Siglip2ImageProcessor


# (module, name, what to put there when a transformers release lacks it). The names Tencent's files import
# whose meaning survives in 5.x under another name or as a no-op; anything else missing stays an ImportError,
# which the loader reports with the file.
IMPORT_FALLBACKS: tuple[tuple[str, str, object], ...] = (
    # 5.x outputs and generation kwargs call the cache "cache" (4.x: "past_key_values", first in its list)
    ("transformers.generation.utils", "ALL_CACHE_NAMES",
     lambda: ["cache", "past_key_values", "state", "mems", "past_buckets_states"]),
    ("transformers.generation.utils", "GenerationConfig", lambda: importlib.import_module("transformers").GenerationConfig),
    ("transformers.utils", "add_start_docstrings", lambda: _identity_docstring_decorator),
    ("transformers.utils", "add_start_docstrings_to_model_forward", lambda: _identity_docstring_decorator),
    ("transformers.utils", "is_flash_attn_2_available", lambda: _flash_attn_2_available),
    # 5.x dropped the "Fast" suffix of image processors (5.25 keeps the old name as a deprecated alias)
    ("transformers", "Siglip2ImageProcessorFast", _siglip2_image_processor),
)


def prepare_transformers5_import() -> list[str]:
    """Put back, in the transformers modules, the names remote 4.x code imports that this 5.x release removed
    (``from transformers.generation.utils import ALL_CACHE_NAMES`` would otherwise be an ImportError before the
    model exists). Only missing names are set; returns ``module.name`` for each one set. No-op under 4.x."""
    if transformers_major() < 5:
        return []
    added = []
    for module_name, name, make in IMPORT_FALLBACKS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            present = hasattr(module, name)
        except Exception:  # noqa: BLE001 - a lazy module that fails to resolve the name: treat it as missing
            present = False
        if present:
            continue
        try:
            value = make()
        except Exception as err:  # noqa: BLE001 - nothing to alias it to in this release: leave the ImportError
            log.debug("transformers %s lacks %s.%s and has nothing to stand in for it: %s", _version(), module_name,
                      name, err)
            continue
        setattr(module, name, value)
        added.append(f"{module_name}.{name}")
    if added:
        log.info("transformers %s: restored removed names for remote code: %s", _version(), ", ".join(added))
    return added


# ------------------------------------------------------------------------------ on the model


def _version() -> str:
    import transformers

    return transformers.__version__


def _remote_module(model_or_module):
    if isinstance(model_or_module, types.ModuleType):
        return model_or_module
    return sys.modules.get(type(model_or_module).__module__)


def static_cache_subclasses(module) -> list[type]:
    """The ``StaticCache`` subclasses of the remote code, found in the model's module namespace (Tencent's
    ``HunyuanStaticCache``; the fake's ``TinyStaticCache``); transformers' own classes are not ours to change."""
    from transformers.cache_utils import StaticCache

    found = []
    for value in list(vars(module).values()):
        if isinstance(value, type) and issubclass(value, StaticCache) and \
                not value.__module__.startswith("transformers.") and value not in found:
            found.append(value)
    return found


def _needs_value_states(layer) -> bool:
    try:
        params = inspect.signature(layer.lazy_initialization).parameters
    except (TypeError, ValueError):
        return False
    value = params.get("value_states")
    return value is not None and value.default is inspect.Parameter.empty


def shim_one_argument_lazy_initialization(cache_cls: type) -> bool:
    """transformers 5's ``StaticLayer.lazy_initialization(key_states, value_states)`` takes the value states too
    (4.57: ``lazy_initialization(key_states)``). A cache written for 4.57 that initializes its layers itself
    (Tencent's ``HunyuanStaticCache.update``) calls it with the keys only: TypeError in the first attention of
    the first step. Each layer of such a cache gets a ``lazy_initialization`` whose ``value_states`` defaults to
    the keys (the buffers take shape, dtype and device from it; keys and values share their head size in these
    models). Returns True when the class carries the shim (now or from an earlier call)."""
    if getattr(cache_cls.__init__, SHIMMED, False):
        return True
    original_init = cache_cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        for layer in getattr(self, "layers", ()):
            if _needs_value_states(layer):
                two_arguments = layer.lazy_initialization

                def lazy_initialization(key_states, value_states=None, _init=two_arguments):
                    return _init(key_states, key_states if value_states is None else value_states)

                layer.lazy_initialization = lazy_initialization

    setattr(__init__, SHIMMED, True)
    cache_cls.__init__ = __init__
    return True


def _takes_past_key_values_not_cache(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "past_key_values" in params and "cache" not in params


def _with_keyword(signature: inspect.Signature, name: str) -> inspect.Signature:
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return signature.replace(parameters=params)


def shim_cache_kwarg_rename(model_cls: type) -> bool:
    """transformers 5 renamed ``past_key_values`` to ``cache``: in model outputs (``CausalLMOutputWithPast.cache``),
    in ``ALL_CACHE_NAMES`` (``["cache", ...]``) and in ``generate``'s kwargs. 4.x code whose
    ``prepare_inputs_for_generation(input_ids, past_key_values=None, **kwargs)`` reads ``past_key_values`` then
    loses its cache: its own ``_update_model_kwargs_for_generation`` walks ``ALL_CACHE_NAMES`` and hands the cache
    on as ``cache`` (Tencent's denoising loop runs every step after the first without the text's keys/values -
    a size mismatch in attention), and ``generate`` refuses the renamed keyword ("model_kwargs are not used by the
    model: ['cache']"). Bridged: a ``cache`` keyword is passed on as ``past_key_values``, and the signature
    ``generate`` checks lists ``cache``. Returns True when the class carries the shim (now or from an earlier
    call); False when its hook needs none (none of its own, or it takes ``cache`` already)."""
    original = model_cls.__dict__.get("prepare_inputs_for_generation")
    if original is not None and getattr(original, SHIMMED, False):
        return True
    if original is None or not _takes_past_key_values_not_cache(original):
        return False

    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        if "cache" in kwargs:
            cache = kwargs.pop("cache")
            if kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = cache
        return original(self, *args, **kwargs)

    prepare_inputs_for_generation.__signature__ = _with_keyword(inspect.signature(original), "cache")
    setattr(prepare_inputs_for_generation, SHIMMED, True)
    model_cls.prepare_inputs_for_generation = prepare_inputs_for_generation
    return True


# Keys transformers 5's decoding loops read from ``model_kwargs`` after ``_update_model_kwargs_for_generation``
# (``_sample``: ``model_kwargs["use_cache"]``); 4.x's loops did not, so a 4.x override may return a fresh dict
# without them.
GENERATION_LOOP_KEYS = ("use_cache",)


def shim_update_model_kwargs_keeps_loop_keys(model_cls: type) -> bool:
    """transformers 5's ``_sample`` reads ``model_kwargs["use_cache"]`` after every
    ``_update_model_kwargs_for_generation``; 4.x's did not. An override that builds a fresh dict with only its own
    keys (Tencent's, in its text steps: think / recaption / the "auto" size) drops it: KeyError 'use_cache' at the
    first decode step. Bridged by carrying those loop keys over from the incoming ``model_kwargs`` (nothing else:
    Tencent tells the prefill from the decode steps by the keys it drops). Returns True when the class carries
    the shim (now or from an earlier call); False when it has no such override."""
    original = model_cls.__dict__.get("_update_model_kwargs_for_generation")
    if original is not None and getattr(original, SHIMMED, False):
        return True
    if original is None:
        return False

    @functools.wraps(original)
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        updated = original(self, outputs, model_kwargs, *args, **kwargs)
        if isinstance(updated, dict) and updated is not model_kwargs:
            for key in GENERATION_LOOP_KEYS:
                if key in model_kwargs and key not in updated:
                    updated[key] = model_kwargs[key]
        return updated

    setattr(_update_model_kwargs_for_generation, SHIMMED, True)
    model_cls._update_model_kwargs_for_generation = _update_model_kwargs_for_generation
    return True


def apply_transformers5_shims(model_or_module) -> list[str]:
    """Bridge the 4.x API uses of a remote model (or its module: then the cache classes only) to the installed
    transformers 5.x; returns one line per shim in effect on it - the same lines on a second call, which changes
    nothing; empty under 4.x or when the code has none of those API uses. The shims change the remote classes, so
    every instance of them is covered."""
    if transformers_major() < 5:
        return []
    module = _remote_module(model_or_module)
    applied = []
    for cls in static_cache_subclasses(module) if module is not None else []:
        if shim_one_argument_lazy_initialization(cls):
            applied.append(f"{cls.__name__}: its layers' lazy_initialization takes the keys alone (4.x call)")
    if isinstance(model_or_module, nn.Module):
        for cls in type(model_or_module).__mro__:
            if cls.__module__.startswith(("transformers.", "torch.")):
                continue
            if shim_cache_kwarg_rename(cls):
                applied.append(f"{cls.__name__}.prepare_inputs_for_generation: the 5.x 'cache' keyword passed on "
                               "as past_key_values")
            if shim_update_model_kwargs_keeps_loop_keys(cls):
                applied.append(f"{cls.__name__}._update_model_kwargs_for_generation keeps "
                               f"{', '.join(GENERATION_LOOP_KEYS)} for 5.x's decoding loop")
    if applied:
        log.debug("transformers %s shims in effect: %s", _version(), "; ".join(applied))
    return applied


# ------------------------------------------------------------------------------ what cannot be bridged


def _probe_static_cache(cache_cls: type, config) -> None:
    """Build the cache the way 4.x code does and write at 1-D then per-row 2-D positions, on the CPU: raises
    when the installed cache API is not what the shims bridge."""
    cache = cache_cls(config=config, batch_size=1, max_cache_len=4, dtype=torch.float32)
    keys = torch.arange(16, dtype=torch.float32).reshape(1, 1, 2, 8)
    out_k, out_v = cache.update(keys, -keys, 0, {"cache_position": torch.arange(2)})
    later = keys + 100
    out_k, out_v = cache.update(later, -later, 0, {"cache_position": torch.arange(2, 4)[None]})
    if tuple(out_k.shape) != (1, 1, 4, 8) or not torch.equal(out_k[:, :, :2], keys) \
            or not torch.equal(out_k[:, :, 2:], later) or not torch.equal(out_v, -out_k):
        raise RuntimeError(f"update wrote {tuple(out_k.shape)} keys that are not the states given at the positions given")


def transformers5_blockers(model: nn.Module, required_caches: tuple[str, ...] = ()) -> list[str]:
    """What the shims cannot bridge for this model under the installed transformers, one line each; empty when
    it can run (or under 4.x). Call after :func:`apply_transformers5_shims`. ``required_caches``: class names the
    model's module must define as ``StaticCache`` subclasses (the loader passes ``HunyuanStaticCache`` for
    Tencent's code)."""
    major = transformers_major()
    if major < SHIMMED_MAJOR:
        return []
    if major > SHIMMED_MAJOR:
        return [(f"transformers {_version()}: the shims bridge the 5.x API (checked: {CHECKED_VERSIONS}); "
                 f"{major}.x is not known to them")]
    module = _remote_module(model)
    if module is None:
        return []
    blockers = []
    caches = static_cache_subclasses(module)
    for name in required_caches:
        if name in vars(module) and vars(module)[name] not in caches:
            blockers.append(f"{name} is not a subclass of this transformers' StaticCache (the shims bridge that API)")
    config = getattr(model, "config", None)
    for cls in caches:
        try:
            _probe_static_cache(cls, config)
        except Exception as err:  # noqa: BLE001 - any failure is the refusal's reason
            text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            blockers.append(f"{cls.__name__} against the transformers {_version()} cache API: "
                            f"{type(err).__name__}{': ' + text if text else ''}")
    return blockers
