import pytest
import torch


@pytest.fixture
def gen():
    """A fresh seeded generator per test: reproducible, but each test draws its own data."""
    return torch.Generator().manual_seed(1234)
