"""`headroom doctor` and the Doctor node on the demo's files: exit 0 with the plan's keys, the three tiers under
small budgets, exit 2 with one line for a path that is not a model."""

import json

import pytest
from cliutil import cli_user_error, run_cli
from comfyui_headroom.demo.model import DemoConfig
from comfyui_headroom.demo.run import ensure_checkpoint, ensure_int8
from comfyui_headroom.memory import module_bytes
from comfyui_headroom.memory.doctor import diagnose, header_model, model_files, oom_advice
from comfyui_headroom.nodes.doctor_node import HeadroomDoctor

CFG = DemoConfig(hidden=128, depth=8, heads=2, latent_channels=4, latent_size=8)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    bf16, _ = ensure_checkpoint("micro", CFG, seed=0, folder=folder)
    int8, _, _ = ensure_int8(bf16, "rowwise")
    return bf16, int8


def test_the_header_model_has_the_file_s_blocks_and_bytes(demo_files):
    bf16, _ = demo_files
    model = header_model(model_files(bf16))
    assert len(model.blocks) == 8 and model.blocks[3].mlp.fc1.weight.is_meta
    header_len = int.from_bytes(bf16.read_bytes()[:8], "little")
    assert module_bytes(model) == bf16.stat().st_size - 8 - header_len  # every tensor byte, nothing else


def test_doctor_json_on_the_demo_file_with_small_budgets(demo_files, tmp_path):
    bf16, _ = demo_files
    block = module_bytes(header_model([bf16]).blocks[0])
    gpu_gb, ram_gb = (4 * block + 2 ** 20) / 2 ** 30, (4 * block) / 2 ** 30
    done = run_cli("doctor", bf16, "--gpu-budget-gb", f"{gpu_gb:.6f}", "--ram-budget-gb", f"{ram_gb:.6f}",
                   "--read-test-mb", "1", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report) >= {"machine", "model", "disk", "pcie_gb_s", "plans"}
    assert report["machine"]["ram_total_bytes"] > 0 and report["disk"]["bytes"] == 2 ** 20
    assert report["disk"]["gb_per_s"] > 0
    default, given = report["plans"]
    assert default["name"] == "default" and given["name"] == "given" and given["fits"]
    assert given["blocks_on_gpu"] + given["blocks_in_ram"] + given["blocks_on_disk"] == 8
    assert given["blocks_on_disk"] > 0 and given["ram_bytes"] <= given["ram_budget_bytes"]
    assert given["disk_bytes_per_step"] == given["blocks_on_disk"] * block
    assert given["step_bound_s"] >= given["disk_bytes_per_step"] / 2 ** 30 / report["disk"]["gb_per_s"] * 0.999
    text = run_cli("doctor", bf16, "--ram-budget-gb", f"{ram_gb:.6f}", "--read-test-mb", "1", cwd=tmp_path)
    assert text.returncode == 0 and "on disk" in text.stdout and "step-time bound" in text.stdout


def test_a_budget_that_cannot_hold_the_disk_ring_does_not_fit(demo_files):
    _, int8 = demo_files
    report = diagnose(int8, 0, 1024, read_test_bytes=2 ** 20, measure_pcie=False)
    given = report["plans"][1]
    assert given["fits"] is False and "disk read ring" in given["error"]
    assert "does not fit" in oom_advice(int8, 0, 1024) and "what to change" in oom_advice(int8, 0, 1024)


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda p: p / "missing.safetensors", "does not exist"),
    (lambda p: p, "holds no .safetensors file"),
    (lambda p: _write(p / "bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
     "not a valid safetensors file"),
])
def test_a_path_that_is_not_a_model_is_one_line_exit_2(tmp_path, make, expected):
    folder = tmp_path / "m"
    folder.mkdir()
    line = cli_user_error("doctor", make(folder), cwd=tmp_path)
    assert line.startswith("headroom doctor: error: ") and expected in line


def test_bad_budget_flags_are_user_errors(tmp_path, demo_files):
    assert "is not a number (GB)" in cli_user_error("doctor", demo_files[0], "--ram-budget-gb", "lots", cwd=tmp_path)
    assert "at least 1 MB" in cli_user_error("doctor", demo_files[0], "--read-test-mb", "0", cwd=tmp_path)


def test_the_doctor_node_shows_the_plan(demo_files):
    out = HeadroomDoctor().run(str(demo_files[1]), 0.0, 0.0)
    text = out["result"][0]
    assert out["ui"]["text"] == [text] and "default budgets" in text and "disk:" in text
    with pytest.raises(ValueError, match="Doctor: .* does not exist"):
        HeadroomDoctor().run("/no/such/model.safetensors", 0.0, 0.0)
