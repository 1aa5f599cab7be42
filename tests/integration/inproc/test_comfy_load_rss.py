"""Seed 003: loading a bf16 checkpoint with quantize_on_load needs no RAM for a second full copy.

A synthetic Flux of ``HEADROOM_RSS_TEST_GB`` (default 1.9 GB bf16) is written tensor by tensor, then loaded
through ComfyUI's loader with our ops in a fresh process under a MemoryTracker. Peak RSS growth must stay
within the loaded model's own size (INT8 layers + the layers kept in float) + 1.5 GB - the stock path holds
the whole bf16 file mapped plus the model.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from comfyui_headroom.quant.safetensors_stream import StreamingWriter, TensorInfo
from comfyui_models import flux_layout, flux_tensor

GB = 2**30
TARGET_GB = float(os.environ.get("HEADROOM_RSS_TEST_GB", "1.9"))

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.sd
import torch
from comfyui_headroom.memory import MemoryTracker
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig
from comfyui_headroom.integrations.comfyui.load import load_int8_diffusion_model
with MemoryTracker() as tracker:
    patcher, record = load_int8_diffusion_model(sys.argv[1], Int8LoadConfig(float_dtype=torch.bfloat16))
model_bytes = sum(t.numel() * t.element_size() for t in patcher.model.state_dict().values())
print("RESULT " + json.dumps({"start": tracker.report.start_rss_bytes, "peak": tracker.report.peak_rss_bytes,
                              "int8": record.int8_bytes, "model": model_bytes, "int8_layers": record.int8_layers,
                              "released": record.released_bytes, "status": record.summary() + " | " + str(tracker.report)}))
"""


def _layout_for(target_gb):
    for depth in range(1, 12):
        layout = flux_layout(hidden=3072, depth=depth, single=depth)
        if sum(math.prod(s) for _, s, _ in layout) * 2 >= target_gb * GB * 0.95:
            return layout
    return layout


@pytest.mark.slow
def test_quantize_on_load_peak_rss(workdir):
    layout = _layout_for(TARGET_GB)
    size = sum(math.prod(s) for _, s, _ in layout) * 2
    free = os.statvfs(workdir).f_bavail * os.statvfs(workdir).f_frsize
    if free < size * 1.5:
        pytest.skip(f"needs {size * 1.5 / GB:.1f} GB of free disk")
    path = workdir / "flux_big_bf16.safetensors"
    gen = torch.Generator().manual_seed(0)
    writer = StreamingWriter(path, {k: TensorInfo(torch.bfloat16, tuple(s)) for k, s, _ in layout})
    for key, shape, std in layout:
        writer.write(key, flux_tensor(shape, std, gen))
    writer.close()
    comfy = os.environ["COMFYUI_DIR"]
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), comfy], capture_output=True, text=True, timeout=1200)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(line[len("RESULT "):])
    growth = r["peak"] - r["start"]
    print(f"\nbf16 file {size / GB:.2f} GB -> model {r['model'] / GB:.2f} GB (INT8 {r['int8'] / GB:.2f} GB); "
          f"peak RSS growth {growth / GB:.2f} GB; {r['status']}")
    assert r["int8_layers"] > 0 and r["released"] > 0.5 * size
    assert growth <= r["model"] + 1.5 * GB, (growth / GB, r)
    assert growth < size  # less than the bf16 file itself: no second full copy
