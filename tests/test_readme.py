"""The README's promises, run: every `headroom ...` line of its "Command line" block and its "Library" snippet.

The files the commands name (model.safetensors, model_folder/, style.safetensors) are made here; each command runs
in a fresh folder holding them, as a reader would try one line after another's output is gone. A command the
README shows that exits non-zero, or a new one this test does not know how to prepare, fails the test.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from comfyui_headroom import cli
from safetensors.torch import save_file

README = Path(__file__).resolve().parents[1] / "README.md"
DIM = 1024


def _block(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```(?:bash|python)\n(.*?)```", section, re.S).group(1)


def _commands() -> list[str]:
    lines = []
    for line in _block("Command line").splitlines():
        command = line.split("#", 1)[0].strip()
        if command.startswith("headroom "):
            # "[--json]" marks an optional flag: run the line without and with it
            if "[" in command:
                bare = re.sub(r"\s*\[[^\]]*\]", "", command)
                lines += [bare, re.sub(r"\[([^\]]*)\]", r"\1", command)]
            else:
                lines.append(command)
    return lines


COMMANDS = _commands()


def _make_inputs(folder: Path, gen: torch.Generator) -> None:
    """model.safetensors, model_folder/ (two shards + index) and a kohya LoRA style.safetensors."""
    linears = {"blocks.0.attn.qkv": (3 * DIM, DIM), "blocks.0.attn.q_proj": (DIM, DIM),
               "blocks.1.mlp.fc1": (2 * DIM, DIM), "final_layer.linear": (64, DIM)}
    sd = {f"{n}.weight": (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in linears.items()}
    sd["blocks.0.norm.weight"] = torch.ones(DIM, dtype=torch.bfloat16)
    save_file(sd, str(folder / "model.safetensors"))
    shards = folder / "model_folder"
    shards.mkdir()
    names = sorted(sd)
    half = len(names) // 2
    index = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(shards / shard))
        index.update({k: shard for k in part})
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    lora = {}
    for name, (out_f, in_f) in linears.items():
        base = "lora_unet_" + name.replace(".", "_")
        lora[base + ".lora_down.weight"] = torch.randn(4, in_f, generator=gen) * 0.05
        lora[base + ".lora_up.weight"] = torch.randn(out_f, 4, generator=gen) * 0.05
        lora[base + ".alpha"] = torch.tensor(4.0)
    save_file(lora, str(folder / "style.safetensors"))


def test_the_readme_shows_the_commands_this_test_runs():
    kinds = {c.split()[1] for c in COMMANDS}
    assert {"convert", "inspect", "gpu-info", "kernels", "demo"} <= kinds, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, tmp_path, monkeypatch, capsys):
    gen = torch.Generator().manual_seed(0)
    _make_inputs(tmp_path, gen)
    argv = shlex.split(command)[1:]
    if argv[0] == "inspect":  # it reads what an earlier line wrote: make that first
        assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / argv[1]), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADROOM_CACHE", str(tmp_path / "cache"))
    code = cli.main(argv)
    out = capsys.readouterr()
    assert code == 0, (command, out.err[-2000:])
    assert out.out.strip(), f"{command} printed nothing"


def test_readme_library_snippet_runs(capsys):
    snippet = _block("Library")
    model = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.GELU(), torch.nn.Linear(DIM, DIM)).to(torch.bfloat16)
    x = torch.randn(4, DIM, dtype=torch.bfloat16)
    namespace = {"model": model, "x": x}
    exec(compile(snippet, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Peak RAM" in printed and type(model[0]).__name__ == "Int8Linear"
