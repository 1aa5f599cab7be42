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
