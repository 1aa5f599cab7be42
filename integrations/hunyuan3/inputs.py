"""What a user gives the HunyuanImage-3 road - the choices, the packages it needs - and the checks that refuse a
bad one with a one-line message saying what to do.

Torch-free and import-light: the nodes build their widgets from these tuples at import time, so a
node offers exactly what the library accepts (same values, same order: saved workflows keep loading).
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

MODES = ("int8", "nf4", "bf16")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAPS = ("auto", "manual")  # the loader also takes an explicit {module: device} dict
OFFLOAD_MODES = ("disabled", "smart", "always")
POST_ACTIONS = ("keep", "soft_unload", "unload")

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


def packages_for(mode: str) -> tuple[str, ...]:
    """What a load in ``mode`` imports: BF16 needs no bitsandbytes."""
    return tuple(p for p in EXTRA_PACKAGES if p != "bitsandbytes" or mode != "bf16")


def require_packages(names: Sequence[str] = EXTRA_PACKAGES) -> None:
    """Import each package; the first that is missing (or broken) raises :class:`MissingPackage` naming it and
    the install command, instead of an ImportError from deep inside a load."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if (err.name or name).split(".")[0] != name:  # installed, but one of its own dependencies is not
                raise MissingPackage(f"{name} is installed but does not import ({first_line(err)}); reinstall "
                                     f"the HunyuanImage-3 packages: {EXTRA_INSTALL} (ComfyUI users: "
                                     f"{COMFYUI_INSTALL})") from None
            raise MissingPackage(f"HunyuanImage-3 loading needs the Python package {name!r}, which is not "
                                 f"installed: {EXTRA_INSTALL} (ComfyUI users: {COMFYUI_INSTALL})") from None
        except (ImportError, OSError, RuntimeError) as err:  # a broken install (native library, version clash)
            raise MissingPackage(f"{name} is installed but does not import ({first_line(err)}); reinstall the "
                                 f"HunyuanImage-3 packages: {EXTRA_INSTALL} (ComfyUI users: {COMFYUI_INSTALL})") \
                from None


# ------------------------------------------------------------------------------ choices


def check_choice(name: str, value: Any, choices: Sequence[str], error: type[Exception] = LoaderError) -> str:
    if value not in choices:
        raise error(f"{name}={shown(value)}: choose one of {', '.join(choices)}")
    return value
