"""Bad input to ``headroom kernels`` and ``headroom gpu-info``, through the real CLI in a subprocess: exit code 2 and
one line on stderr that names the value, never a traceback. And what ``headroom kernels`` says: a reason per shape,
tile configs only for Triton kernels that run here."""

import json

import pytest
import torch
from cliutil import cli_user_error, run_cli
from comfyui_headroom.cli import main
from safetensors.torch import save_file

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("argv, expected", [
    (["kernels", "--device", f"cuda:{GPUS + 6}"], f"--device cuda:{GPUS + 6}: cuda:{GPUS + 6} does not exist"),
    (["kernels", "--device", "npu:0"], "--device npu:0: 'npu:0' is not a device headroom runs on: write cpu, cuda or cuda:N"),
    (["kernels", "--device", "cuda:x"], "'cuda:x' is not a device"),
    (["kernels", "--device", "meta"], "'meta' is not a device"),
    (["kernels", "--tokens", "0"], "--tokens 0: M must be from 1 to 16777216"),
    (["kernels", "--tokens", "256", "x"], "--tokens 'x' is not a whole number"),
    (["kernels", "--tokens", "-3"], "--tokens -3: M must be from 1"),
    (["gpu-info", "--width", "-5"], "image size must be positive, 1 to 65536 pixels per side, got -5x1024"),
    (["gpu-info", "--width", "0", "--height", "0"], "got 0x0"),
    (["gpu-info", "--height", "100000"], "got 1024x100000"),
    (["gpu-info", "--width", "x"], "--width 'x' is not a whole number"),
    (["gpu-info", "--reserve-gb", "nan"], "--reserve-gb nan: expected a number from 0 to 1,000,000"),
    (["gpu-info", "--reserve-gb=-inf"], "--reserve-gb -inf"),
    (["gpu-info", "--reserve-gb", "1e9"], "--reserve-gb 1000000000.0"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, expected):
    """In process (fast); the subprocess tests below check the same through ``python -m comfyui_headroom``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"headroom {argv[0]}: error: ") and expected in err, err


@pytest.mark.parametrize("argv", [["kernels", "--device", f"cuda:{GPUS + 6}"], ["gpu-info", "--reserve-gb", "nan"],
                                  ["kernels", "--tokens", "x"]])
def test_bad_flags_through_the_real_command(tmp_path, argv):
    cli_user_error(*argv, cwd=tmp_path)


@pytest.mark.skipif(GPUS > 0, reason="a machine with a GPU has cuda")
def test_kernels_on_cuda_without_a_gpu_says_so(tmp_path):
    err = cli_user_error("kernels", "--device", "cuda", cwd=tmp_path)
    assert "--device cuda: cuda does not exist (no CUDA GPU is present" in err and "use cpu" in err


def test_an_unknown_forced_kernel_is_an_error_for_kernels_and_harmless_elsewhere(tmp_path):
    env = {"HEADROOM_FORCE_KERNEL": "bogus"}
    err = cli_user_error("kernels", "--device", "cpu", cwd=tmp_path, env=env)
    assert "HEADROOM_FORCE_KERNEL='bogus': unknown INT8 kernel 'bogus'; choose one of auto" in err
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    done = run_cli("inspect", path, cwd=tmp_path, env=env)  # importing the package used to fail on it
    assert done.returncode == 0, done.stderr[-3000:]


def test_kernels_on_a_cpu_gives_a_reason_per_shape_and_no_gpu_tiles(tmp_path):
    done = run_cli("kernels", "--device", "cpu", "--tokens", "1", "4096", cwd=tmp_path, env={"TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    choices = [line for line in lines if line.startswith("  M=")]
    assert len(choices) == 4
    assert all("-> reference" in line and "not a CUDA device" in line for line in choices), choices
    assert "GemmConfig" not in done.stdout and "tile configs: none (no Triton kernel runs here)" in lines
    done = run_cli("kernels", "--device", "cpu", "--tokens", "64", "--json", cwd=tmp_path,
                   env={"TRITON_INTERPRET": "0", "HEADROOM_FORCE_KERNEL": "int_mm"})
    info = json.loads(done.stdout)
    assert info["choices"] == {"M=64 rowwise": "int_mm", "M=64 block": "reference"}
    assert info["why"]["M=64 rowwise"] == "forced by HEADROOM_FORCE_KERNEL"
    assert info["why"]["M=64 block"].startswith("int_mm is forced by HEADROOM_FORCE_KERNEL but cannot run this call")
    assert info["tiles"] == {} and "w8a8_config" not in info


@pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")
def test_kernels_on_a_gpu_shows_the_tiles_of_the_triton_kernels_it_picks(tmp_path):
    done = run_cli("kernels", "--device", "cuda:0", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout)
    triton = {k for k in info["choices"].values() if k.startswith("triton_")}
    assert set(info["tiles"]) == triton and all(info["tiles"][k] for k in triton)
    assert all(info["why"][shape] for shape in info["choices"])


@pytest.mark.parametrize("device, expected", [
    ("npu:0", "'npu:0' is not a device headroom runs on"), ("garbage", "'garbage' is not a device"),
    ("meta", "'meta' is not a device"), (f"cuda:{GPUS + 6}", f"cuda:{GPUS + 6} does not exist")])
def test_convert_refuses_a_device_it_cannot_use_before_reading(tmp_path, device, expected):
    path = tmp_path / "m.safetensors"
    save_file({"w.weight": torch.zeros(2048, 2048, dtype=torch.bfloat16)}, str(path))
    err = cli_user_error("convert", path, tmp_path / "out.safetensors", "--device", device, cwd=tmp_path)
    assert f"--device '{device}': " in err and expected in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("argv, expected", [
    (["convert", "a", "b", "--block-size", "x"], "argument --block-size: invalid int value: 'x'"),
    (["convert", "a", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "the following arguments are required: COMMAND"),
])
def test_command_line_mistakes_are_one_line_too(tmp_path, argv, expected):
    done = run_cli(*argv, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr and "--help)" in done.stderr, \
        done.stderr
