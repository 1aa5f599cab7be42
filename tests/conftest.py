import sys
from pathlib import Path

import pytest
import torch

# The repo root *is* the package (comfyui_headroom). `python -m pytest` from the root puts it on sys.path, where
# our kernels/ folder would shadow Hugging Face's `kernels` package that transformers probes for, and importing
# transformers' model code then fails. Tests import the package by its name, so the root is never needed here.
_REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO_ROOT]


@pytest.fixture
def gen():
    """A fresh seeded generator per test: reproducible, but each test draws its own data."""
    return torch.Generator().manual_seed(1234)


# Triton's compiled module (nanobind) prints ~25 lines of "nanobind: leaked ..." at interpreter shutdown once its
# interpreter ran, burying pytest's summary. The run is over by then: after pytest's last hook, with triton
# loaded, the process exits with pytest's status without the interpreter's teardown. HEADROOM_TEST_FULL_EXIT=1
# keeps the normal teardown (to look at what it prints).
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config):
    import os

    if _EXIT_STATUS and "triton._C.libtriton" in sys.modules and os.environ.get("HEADROOM_TEST_FULL_EXIT") != "1" \
            and not hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
