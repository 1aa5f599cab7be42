"""The package imports with and without ComfyUI on the path."""

import subprocess
import sys



def test_imports_without_comfyui():
    code = ("import sys, comfyui_headroom as h; assert 'comfy' not in sys.modules; "
            "assert isinstance(h.NODE_CLASS_MAPPINGS, dict); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "comfyui_headroom", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "headroom" in out.stdout
