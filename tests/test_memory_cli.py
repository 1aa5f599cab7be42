"""`headroom gpu-info` (memory/cli_memory.py)."""

import torch
from comfyui_headroom.cli import main
from comfyui_headroom.cli.memory import gpu_info_lines


def test_gpu_info_runs_and_says_what_it_found(capsys):
    assert main(["gpu-info", "--width", "1920", "--height", "1080"]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "default weight budget (55 %)" in out and "at 1920x1080" in out
    else:
        assert out.strip() == gpu_info_lines(1920, 1080)[0] and "no CUDA" in out
