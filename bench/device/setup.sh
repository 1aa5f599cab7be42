# Sourced at the start of a `device` run (from the repo root there): makes the carried wheels importable,
# the repo importable as comfyui_headroom, ComfyUI extracted.   . bench/device/setup.sh
R="$(pwd)"
mkdir -p /tmp/site /tmp/pkg
for whl in "$R"/.carry/*/*.whl; do
    [ -f "$whl" ] && unzip -q -o "$whl" -d /tmp/site
done
ln -sfn "$R" /tmp/pkg/comfyui_headroom
if [ -f "$R/.carry/comfyui-v0.29.0.tar.xz" ] && [ ! -d /tmp/comfyui ]; then
    tar -xJf "$R/.carry/comfyui-v0.29.0.tar.xz" -C /tmp
fi
export R COMFYUI_DIR=/tmp/comfyui PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:/tmp/pkg:$R/.carry/server/stub${PYTHONPATH:+:$PYTHONPATH}"
