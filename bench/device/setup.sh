# Sourced at the start of a `device` run (from the repo root there): makes the carried wheels importable,
# the repo importable as comfyui_headroom, ComfyUI extracted.   . bench/device/setup.sh
R="$(pwd)"
mkdir -p /tmp/site /tmp/pkg
python3 - <<'PY'
import glob, zipfile
for wheel in sorted(glob.glob(".carry/*/*.whl")):  # no unzip on that machine
    zipfile.ZipFile(wheel).extractall("/tmp/site")
PY
ln -sfn "$R" /tmp/pkg/comfyui_headroom
if [ -f "$R/.carry/comfyui-v0.29.0.tar.xz" ] && [ ! -d /tmp/comfyui ]; then
    tar -xJf "$R/.carry/comfyui-v0.29.0.tar.xz" -C /tmp
fi
export R COMFYUI_DIR=/tmp/comfyui PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:/tmp/pkg:$R/.carry/server/stub${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
