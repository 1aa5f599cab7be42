#!/usr/bin/env bash
# Builds .carry/ in the repo root: what a GPU machine of the `device` tool lacks, to name in `run`'s `carry`.
# Runs here (it downloads wheels for that machine's Python 3.12, x86-64); idempotent. .carry/ is git-ignored
# through .git/info/exclude. One call may carry at most 64 MiB with the tree: see bench/device/README.md for
# which folders go together.
#   bash bench/device/carry.sh [HY3_GIT_DIR]
# HY3_GIT_DIR: the git directory that `fetch github:Tencent-Hunyuan/HunyuanImage-3.0` returned (for .carry/hy3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CARRY="$ROOT/.carry"
SHARED="$ROOT/../shared"
cd "$ROOT"
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
mkdir -p "$CARRY"/{base,kitchen,kitchen_slim,server,hy3}

download() {  # download DEST NAME==VERSION ...
    local dest="$1"; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dest" "$@"
}

keep_only() {  # keep_only WHEEL [LIBRARY]: rewrite WHEEL without its native libraries, LIBRARY excepted
    python3 - "$1" "${2:-}" <<'PY'
import os, sys, zipfile
wheel, keep = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        name = os.path.basename(item.filename)
        if ".so" in name and name != keep:
            continue
        dst.writestr(item, src.read(item))
os.replace(wheel + ".tmp", wheel)
PY
}

[ -f "$CARRY/comfyui-v0.29.0.tar.xz" ] || cp "$SHARED/comfyui-v0.29.0.tar.xz" "$CARRY/"

# base: bitsandbytes (only its CUDA 13 library), ComfyUI's DynamicVRAM allocator and two small needs of ComfyUI
if ! ls "$CARRY"/base/bitsandbytes-*.whl >/dev/null 2>&1; then
    download "$CARRY/base" bitsandbytes==0.50.2
    keep_only "$(ls "$CARRY"/base/bitsandbytes-*.whl)" 'libbitsandbytes_cuda130.so'
fi
ls "$CARRY"/base/comfy_aimdo-*.whl >/dev/null 2>&1 || download "$CARRY/base" comfy-aimdo==0.4.10
ls "$CARRY"/base/torchsde-*.whl >/dev/null 2>&1 || download "$CARRY/base" torchsde
ls "$CARRY"/base/trampoline-*.whl >/dev/null 2>&1 || download "$CARRY/base" trampoline

# kitchen: ComfyUI's own INT8 (the anchor); kitchen_slim: the same without its CUDA extension, for calls that
# also carry the server wheels (both together are over 64 MiB)
if ! ls "$CARRY"/kitchen/comfy_kitchen-*.whl >/dev/null 2>&1; then
    download "$CARRY/kitchen" comfy-kitchen==0.2.24
fi
if ! ls "$CARRY"/kitchen_slim/comfy_kitchen-*.whl >/dev/null 2>&1; then
    cp "$CARRY"/kitchen/comfy_kitchen-*.whl "$CARRY/kitchen_slim/"
    keep_only "$(ls "$CARRY"/kitchen_slim/comfy_kitchen-*.whl)"
fi

# server: what ComfyUI's server imports beyond the GPU machine's packages; the frontend as a stub folder
for pkg in av sqlalchemy alembic mako blake3 simpleeval greenlet; do
    ls "$CARRY"/server/"${pkg}"-*.whl "$CARRY"/server/"${pkg^}"-*.whl >/dev/null 2>&1 || download "$CARRY/server" "$pkg"
done
mkdir -p "$CARRY/server/stub/comfyui_frontend_package/static"
: > "$CARRY/server/stub/comfyui_frontend_package/__init__.py"
echo '<!doctype html><title>ComfyUI frontend stub</title>' > "$CARRY/server/stub/comfyui_frontend_package/static/index.html"

# hy3: Tencent's HunyuanImage-3 modeling code (read, never committed)
if [ $# -ge 1 ] && [ ! -f "$CARRY/hy3/hunyuan.py" ]; then
    for f in hunyuan.py configuration_hunyuan.py; do
        git --git-dir "$1" show "HEAD:hunyuan_image_3/$f" > "$CARRY/hy3/$f"
    done
fi
[ -f "$CARRY/hy3/hunyuan.py" ] || echo "note: .carry/hy3 is empty: pass the git dir of fetch github:Tencent-Hunyuan/HunyuanImage-3.0"
du -sh "$CARRY"/* | sort -h
