"""Helpers shared by the tests (import as `from testutil import ...`)."""

import os
import re
import subprocess

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


def ptxas_spills(ptx: str, tmp_path) -> int | None:
    """Spill bytes ptxas reports for this PTX (compiled for sm_90a), or None when this triton ships no ptxas we can
    find. The Hopper kernels' tests compile without a GPU and assert no spills."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception:  # noqa: BLE001 - layout of triton's backend differs between versions
        return None
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    result = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True, check=True)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    assert spills, f"ptxas -v printed no spill line:\n{result.stderr}"
    return sum(spills)
