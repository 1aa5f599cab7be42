"""What every kernel module needs without importing the backends: the refusal exception, whether Triton is
installed, and whether its CPU interpreter is on.

A module of its own so that the kernel modules (``triton_w8a8``, ``gluon_w8a8``, ...) and :mod:`.backends`, which
calls them, do not import each other.
"""

from __future__ import annotations

import importlib.util
import os


class KernelUnsupported(Exception):
    """This call's shape/layout cannot run on the chosen kernel; the dispatcher falls back to reference."""


HAS_TRITON = importlib.util.find_spec("triton") is not None


def _read_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETING = _read_interpret()


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` set before triton was imported; read once)."""
    return _INTERPRETING


def reload_env() -> None:
    """Re-read ``TRITON_INTERPRET`` (see :func:`comfyui_headroom.kernels.reload_env`)."""
    global _INTERPRETING
    _INTERPRETING = _read_interpret()
