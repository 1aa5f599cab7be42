"""In-process tests against a real ComfyUI: they import ``comfy`` from ``COMFYUI_DIR``.

They need ComfyUI's Python dependencies (torchvision, comfy-kitchen, ...), which the main test venv does not
have: there they are not collected, and ``tests/test_comfy_inprocess.py`` runs this folder under
``HEADROOM_COMFY_PYTHON`` instead. ComfyUI runs on the CPU here (``--cpu``).
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/ (testutil, comfyui_models)

_COMFY = os.environ.get("COMFYUI_DIR")
_REASON = None
if not _COMFY or not os.path.isdir(_COMFY):
    _REASON = "COMFYUI_DIR is not set"
else:
    sys.path.insert(0, _COMFY)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.sd  # noqa: F401  (ComfyUI and its dependencies must import here)
    except Exception as err:  # not a ComfyUI venv
        _REASON = f"ComfyUI does not import in this interpreter ({type(err).__name__}: {err})"

if _REASON is not None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy_inproc")
