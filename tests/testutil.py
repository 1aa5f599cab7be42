"""Helpers shared by the tests (import as `from testutil import ...`)."""

import os

import torch


def outlier_weight(out_features, in_features, gen, outlier_channels=4, factor=40.0):
    """Normal weights with a few input channels scaled up: what hurts row-wise INT8 in real models."""
    w = torch.randn(out_features, in_features, generator=gen)
    idx = torch.randperm(in_features, generator=gen)[:outlier_channels]
    w[:, idx] *= factor
    return w


def comfyui_dir():
    path = os.environ.get("COMFYUI_DIR")
    return path if path and os.path.isdir(path) else None


def interpreter_unusable() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels in this environment, or None.

    Triton 3.6's interpreter turns a kernel's scalar arguments into one-element numpy arrays and calls ``int()`` on
    them (``range(0, K, ...)``); numpy 2.5 refuses that for arrays with a dimension (seen on the GPU machine's image:
    triton 3.6.0 + numpy 2.5.2, "only 0-dimensional arrays can be converted to Python scalars"). The compiled
    kernels are not affected: the GPU tests run them."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import numpy
    import triton

    numpy_version = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if numpy_version >= (2, 5) and triton_version <= (3, 6):
        return (f"Triton {triton.__version__}'s interpreter cannot run under numpy {numpy.__version__} (int() of a "
                "one-element array); the GPU tests run the compiled kernels")
    return None


def cli_error(capsys, *argv):
    """Run ``headroom ARGV`` in-process (``convert`` quietly) and return its stderr, asserting the rule for a bad
    input: exit code 2 and exactly one line."""
    from comfyui_headroom import cli

    code = cli.main(list(argv) + (["--quiet"] if argv[0] == "convert" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err
