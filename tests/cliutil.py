"""Run ``python -m comfyui_headroom ...`` in a subprocess, as a user would (import as ``from cliutil import ...``).

The child finds the same package the tests import: the folder above it goes first on ``PYTHONPATH`` (a checkout
linked as ``comfyui_headroom``, or site-packages for an installed one), and the command runs outside the repo,
where the repo's own ``kernels/`` folder cannot shadow other packages.
"""

import os
import subprocess
import sys
from pathlib import Path

import comfyui_headroom

PACKAGE_PARENT = str(Path(comfyui_headroom.__file__).parent.parent)  # not resolved: a symlinked checkout stays one


def run_cli(*argv, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "comfyui_headroom", *map(str, argv)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout, check=False)


def cli_user_error(*argv, cwd, env=None) -> str:
    """The one stderr line of a command that must fail as a user error (exit 2, no traceback)."""
    done = run_cli(*argv, cwd=cwd, env=env)
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("headroom "), lines[0]
    return lines[0]
