#!/usr/bin/env bash
# The single-GPU runs still missing from docs/PERFORMANCE.md (issue #10), in one device call:
#   run(command="bash bench/pending_gpu_runs.sh", kind="nvidia-h100-x1")
# Writes under $OUT: the GPU tests of the rotation kernel, the fused rotate+quantize speed, and the demo
# DiT eager vs torch.compile. Then, on the dev machine, with the fetched files:
#   python bench/rotation.py write bench/results/rotation_quality.json rotation_speed.json
#   python bench/torch_compile.py write torch_compile.json
set -uo pipefail
OUT="${OUT:-/tmp/headroom-out}"
mkdir -p "$OUT" /tmp/pkg
ln -sfn "$PWD" /tmp/pkg/comfyui_headroom
export PYTHONPATH=/tmp/pkg
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests/test_rotation_kernel.py tests/test_kernels_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/summary.txt"
timeout 240 python bench/rotation.py speed --json "$OUT/rotation_speed.json" > "$OUT/rotation_speed.log" 2>&1
echo "rotation speed rc=$?" >> "$OUT/summary.txt"
timeout 300 python bench/torch_compile.py run --size 1b --tokens 4096 --steps 8 --cache-dir /tmp/demo-cache \
    --json "$OUT/torch_compile.json" > "$OUT/torch_compile.log" 2>&1
echo "torch_compile rc=$?" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
