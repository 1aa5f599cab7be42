"""What a user gives the HunyuanImage-3 road - the choices, the numbers, the packages it needs - and the checks
that refuse a bad one with a one-line message saying what to do.

Torch-free and import-light: the nodes build their widgets from these tuples and ranges at import time, so a
node offers exactly what the library accepts (same values, same order: saved workflows keep loading).
"""

from __future__ import annotations

import importlib
import math
import operator
from typing import Any, Sequence

from ...units import MAX_GPU_GB

MODES = ("int8", "nf4", "bf16")
# Who runs INT8: our W8A8 layers and grouped MoE kernel (integrations/hunyuan3/int8_engine.py), or bitsandbytes'
# LLM.int8 (the community loaders' way; about a third of bf16's speed on this model).
INT8_ENGINES = ("headroom", "bitsandbytes")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAPS = ("auto", "manual")  # the loader also takes an explicit {module: device} dict
OFFLOAD_MODES = ("disabled", "smart", "always")
POST_ACTIONS = ("keep", "soft_unload", "unload")

# Accepted ranges. 1024 GB is above the VRAM of any machine one process drives (8 x H200 = 1128 GB is the
# exception, and there each card's own budget is what counts); a budget above its card is clamped to the card.
MAX_GB = float(MAX_GPU_GB)
MAX_GPU_LAYERS = 256  # decoder layers a manual map may keep on the GPU (HunyuanImage-3 has 32)
BUDGET_ZERO = " (0 = 55 % of the card)"

# The [hunyuan3] extra (pyproject.toml); requirements.txt installs it for ComfyUI users.
EXTRA_PACKAGES = ("transformers", "accelerate", "bitsandbytes")
EXTRA_INSTALL = "pip install 'comfyui-headroom[hunyuan3]'"
COMFYUI_INSTALL = "pip install -r requirements.txt in the comfyui-headroom folder, with ComfyUI's Python"


class LoaderError(ValueError):
    """A load that cannot work as asked; the message says what to change."""


class MissingPackage(LoaderError):
    """A package of the [hunyuan3] extra is not installed, or does not import."""


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile value cannot flood or break a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of an exception, for a one-line error that quotes it."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:limit]}"


# ------------------------------------------------------------------------------ packages


def packages_for(mode: str, int8_engine: str = "bitsandbytes") -> tuple[str, ...]:
    """What a load in ``mode`` imports: BF16 and our own INT8 engine need no bitsandbytes."""
    no_bnb = mode == "bf16" or (mode == "int8" and int8_engine == "headroom")
    return tuple(p for p in EXTRA_PACKAGES if p != "bitsandbytes" or not no_bnb)


def require_packages(names: Sequence[str] = EXTRA_PACKAGES) -> None:
    """Import each package; the first that is missing (or broken) raises :class:`MissingPackage` naming it and
    the install command, instead of an ImportError from deep inside a load."""
    install = f"{EXTRA_INSTALL} (ComfyUI users: {COMFYUI_INSTALL})"
    for name in names:
        try:
            importlib.import_module(name)
        except (ImportError, OSError, RuntimeError) as err:  # RuntimeError, OSError: a broken native library
            if isinstance(err, ModuleNotFoundError) and (err.name or name).split(".")[0] == name:
                raise MissingPackage(f"HunyuanImage-3 loading needs the Python package {name!r}, which is not "
                                     f"installed: {install}") from None
            # installed, but it (or one of its own dependencies) does not import
            raise MissingPackage(f"{name} is installed but does not import ({first_line(err)}); reinstall the "
                                 f"HunyuanImage-3 packages: {install}") from None


# ------------------------------------------------------------------------------ choices and numbers


def check_choice(name: str, value: Any, choices: Sequence[str], error: type[Exception] = LoaderError) -> str:
    if value not in choices:
        raise error(f"{name}={shown(value)}: choose one of {', '.join(choices)}")
    return value


def check_gb(name: str, value: Any, *, zero: str = "", high: float = MAX_GB,
             error: type[Exception] = LoaderError) -> float:
    """``value`` in GB as a float; refused unless a finite number from 0 to ``high`` (``zero``: what 0 means)."""
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = math.nan
    if isinstance(value, bool) or not (math.isfinite(gb) and 0.0 <= gb <= high):
        raise error(f"{name}={shown(value)}: give a number of GB from 0 to {high:g}{zero}")
    return gb


def check_count(name: str, value: Any, high: int, error: type[Exception] = LoaderError) -> int:
    """A whole number from 0 to ``high``."""
    try:
        count = operator.index(value)
    except TypeError:
        count = -1
    if isinstance(value, bool) or not 0 <= count <= high:
        raise error(f"{name}={shown(value)}: give a whole number from 0 to {high}")
    return count


MAX_RAM_GB = 65536.0


def check_ram_budget(ram_budget_gb, error: type[Exception] = LoaderError) -> float:
    """``ram_budget_gb`` (the disk tier): a number of GB from 0 (no RAM limit: nothing on disk) up."""
    return check_gb("ram_budget_gb", 0.0 if ram_budget_gb is None else ram_budget_gb,
                    zero=" (0 = no RAM limit, nothing streams from disk)", high=MAX_RAM_GB, error=error)


def check_load_numbers(budget_gb, external_vram_gb, gpu_layers=None, reserve_gb=None):
    """The loader's numbers, checked before anything is read or freed: (budget, external, layers, reserve)."""
    budget = check_gb("gpu_budget_gb", budget_gb, zero=BUDGET_ZERO)
    external = check_gb("external_vram_gb", external_vram_gb)
    layers = None if gpu_layers is None else check_count("gpu_layers", gpu_layers, MAX_GPU_LAYERS)
    reserve = None if reserve_gb is None else check_gb("reserve_gb", reserve_gb)
    return budget, external, layers, reserve
