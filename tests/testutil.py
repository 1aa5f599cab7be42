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


def cli_error(capsys, *argv):
    """Run ``headroom ARGV`` in-process (``convert`` quietly) and return its stderr, asserting the rule for a bad
    input: exit code 2 and exactly one line."""
    from comfyui_headroom import cli

    code = cli.main(list(argv) + (["--quiet"] if argv[0] == "convert" else []))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err
