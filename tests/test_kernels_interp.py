"""Runs tests/kernels_interp_cases.py (the Triton kernels on Triton's CPU interpreter) in a subprocess.

TRITON_INTERPRET must be set before triton is first imported, and the rest of the suite imports triton
without it, hence the separate process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from testutil import interpreter_unusable

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.pop("HEADROOM_FORCE_KERNEL", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "kernels_interp_cases.py")]
    proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter kernel tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
