"""Run tests/integration/inproc (our layers inside a real ComfyUI, in process) under ComfyUI's Python.

ComfyUI needs torch 2.11 + torchvision/torchaudio + its requirements, which the main test venv lacks, so
CI points ``HEADROOM_COMFY_PYTHON`` at a venv that has them (see .ci/run) and this test runs that folder
there in one subprocess. Skips with the reason when either variable is missing.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
COMFY = os.environ.get("COMFYUI_DIR")
PYTHON = os.environ.get("HEADROOM_COMFY_PYTHON")


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFY or not os.path.isdir(COMFY), reason="COMFYUI_DIR is not set (extracted ComfyUI v0.29)")
@pytest.mark.skipif(not PYTHON or not os.path.exists(PYTHON),
                    reason="HEADROOM_COMFY_PYTHON is not set (a venv python with ComfyUI's requirements + this package)")
def test_inprocess_comfyui_suite(tmp_path):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
           os.path.join(HERE, "integration", "inproc")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"in-process ComfyUI tests failed:\n{tail}"
    assert " passed" in result.stdout, tail  # skips inside (e.g. too little disk for the RSS test) show with -rs
    sys.stdout.write(result.stdout[-600:])
