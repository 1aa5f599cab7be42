"""The disk tier on the ComfyUI-native road: which INT8 file the streamed blocks are read from, and its key prefix.

Blocks on disk are read from a safetensors file as stored, so the file must hold exactly what the model's layers
hold: a headroom-format INT8 file (``headroom convert``). A bf16 / fp16 / fp8 file is converted once into the
INT8 cache (:func:`int8_file_for_disk`, the converter of quant/ with the loader's own skip rules, written
atomically), reused while the source file and the settings are unchanged. ComfyUI's other INT8 layouts
(``int8_tensorwise`` with ``comfy_quant`` keys) store scales in another shape than our layers hold them: refused,
with what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ...memory.disk import SafetensorsSource, cache_root
from ...quant.convert import convert_file
from ...quant.formats.metadata import is_headroom_metadata
from ...quant.safetensors_stream import Header
from .ops import Int8LoadConfig, Int8LoadError

# Key prefixes ComfyUI strips from a diffusion model's file (``unet_prefix_from_state_dict``), most specific first.
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")


def cache_dir() -> Path:
    """``$HEADROOM_CACHE/int8`` if set, else ``~/.cache/comfyui-headroom/int8``: not ComfyUI's model folders,
    where a cache file would show up in the loader's list."""
    return cache_root() / "int8"


def _cache_name(source: Path, config: Int8LoadConfig) -> str:
    """A name that changes with the source file (path, size, mtime) and every setting the conversion depends on."""
    stat = source.stat()
    key = json.dumps({"path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "method": config.method, "block_size": config.block_size, "rotate": config.rotation_group,
                      "skips": list(config.patterns)}, sort_keys=True)
    return f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}-int8.safetensors"


def int8_file_for_disk(header: Header, config: Int8LoadConfig) -> tuple[str, bool]:
    """``(file the disk tier streams from, whether it was written now)`` for the file ``header`` describes: that file
    itself when headroom wrote it as INT8, else its INT8 conversion in the cache (written once). Int8LoadError for
    what cannot be streamed."""
    path = str(header.path)
    comfy_layout = any(name.endswith(".comfy_quant") for name in header.tensors)
    if is_headroom_metadata(header.metadata) and not comfy_layout:
        return path, False
    if comfy_layout or any(info.dtype == torch.int8 for info in header.tensors.values()):
        raise Int8LoadError(
            f"{path}: ram_budget_gb streams blocks from the file as stored, and this INT8 file is not in headroom's "
            "format (its scales differ from what the layers hold). Convert its float original with "
            "'headroom convert', or set ram_budget_gb to 0.")
    if not config.quantize_on_load:
        raise Int8LoadError(f"{path}: ram_budget_gb needs the INT8 layers the file is streamed into; turn "
                            "quantize_on_load on (the file is converted once into the INT8 cache) or set "
                            "ram_budget_gb to 0.")
    if config.min_features != Int8LoadConfig.min_features:
        raise Int8LoadError(f"{path}: ram_budget_gb converts the file with the converter's min_features "
                            f"({Int8LoadConfig.min_features}); set min_features back to it or ram_budget_gb to 0.")
    target = cache_dir() / _cache_name(Path(path), config)
    if target.exists():
        return str(target), False
    target.parent.mkdir(parents=True, exist_ok=True)
    convert_file(path, target, method=config.method, block_size=config.block_size, skip=list(config.patterns),
                 keep_default_skips=False, device=str(config.device_for_quantization()), progress=False,
                 rotate=config.rotation_group)
    return str(target), True


def source_for(path: str, model) -> SafetensorsSource:
    """The file's tensors as the disk tier reads them, under the key prefix that maps ``model``'s parameter names
    onto the file's keys. Int8LoadError when none does (ComfyUI converted the file's key names on load)."""
    source = SafetensorsSource([path])
    probe = next((name for name, _ in model.named_parameters()), None)
    for prefix in KEY_PREFIXES:
        if probe is not None and prefix + probe in source.tensors:
            source.prefix = prefix
            return source
    raise Int8LoadError(f"{path}: its tensor names are not the model's ({probe!r} not found under any of "
                        f"{', '.join(repr(p) for p in KEY_PREFIXES)}); ComfyUI renamed them on load, so blocks "
                        "cannot be streamed from it. Convert the file with 'headroom convert' or set ram_budget_gb to 0.")


def float_dtype_of(header: Header) -> torch.dtype | None:
    """The dtype of the file's float tensors (the most bytes): the disk tier streams them as stored, so the model's
    float layers must hold that dtype too."""
    counts: dict = {}
    for info in header.tensors.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    return max(counts, key=counts.get) if counts else None


def planned_disk_blocks(header: Header, blocks_resident: int, ram_budget_bytes: int) -> tuple[str, ...]:
    """The blocks the streamer will read from disk, planned from the file's header alone (the same planner and
    inputs as at load time, on the same bytes), so the load can leave their linear layers without data. Names
    are the model's (the file's key prefix removed). A block planned otherwise later is still correct: the
    streamer reads blocks without data from the file, and parks loaded ones."""
    from ...memory.doctor import DoctorError, header_model
    from ...memory.planner import plan_placement

    prefix = next((p for p in KEY_PREFIXES if all(k.startswith(p) for k in header.tensors)), "")
    try:
        tree = header_model([header.path])
    except DoctorError:  # names that do not form a module tree: load every block, the streamer parks them
        return ()
    plan = plan_placement(tree, 1 << 62, (), blocks_resident, devices=["cpu"], ram_budget_bytes=ram_budget_bytes)
    return tuple(name[len(prefix):] for name in plan.disk_blocks() if name.startswith(prefix))
