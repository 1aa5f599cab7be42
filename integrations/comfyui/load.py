"""Loading ComfyUI models with headroom's INT8 layers: the entry points the loader nodes call.

``comfy.sd.load_diffusion_model`` / ``comfy.sd.load_clip`` build ComfyUI's own model with the ``custom_operations``
of :mod:`.ops`; the result is handed to :class:`~.patcher.Int8ModelPatcher` (:func:`.patcher.adopt_patcher`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from ...kernels.int8 import FP8_DTYPES
from ...quant.safetensors_stream import Header, read_header
from ...units import GB
from .disk_tier import float_dtype_of, int8_file_for_disk, planned_disk_blocks, source_for
from .fused import install_fused_blocks
from .ops import NATIVE_SKIP_PATTERNS, TEXT_ENCODER_SKIP_PATTERNS, Int8LoadConfig, LoadLog, make_int8_ops
from .patcher import adopt_patcher


def _file_dtype_summary(header: Header) -> tuple[dict, torch.dtype | None, int]:
    """(metadata, dominant float dtype of 2-D weights, total bytes) from the header only."""
    counts: dict = {}
    for name, info in header.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    dominant = max(counts, key=counts.get) if counts else None
    return header.metadata, dominant, header.data_bytes


def load_int8_diffusion_model(path: str, config: Int8LoadConfig, budget_bytes: int = 0,
                              progress: Callable[[int, int], None] | None = None, blocks_resident: int = 0,
                              devices: Sequence[str] = (), device_budgets: Sequence[int] = (),
                              ram_budget_bytes: int = 0):
    """``(Int8ModelPatcher, LoadLog)`` for the diffusion model at ``path``, through ComfyUI's loader.

    ``blocks_resident`` > 0: headroom block streaming; with ``ram_budget_bytes`` > 0 the streamed blocks that do
    not fit that much RAM are read from an INT8 file on every pass (the disk tier, :mod:`.disk_tier`: a float file is
    converted once into the INT8 cache and loaded from there). ``devices`` (two or more): the blocks split over
    them when ComfyUI loads the model (``device_budgets``: bytes per device, else evenly by bytes)."""
    if devices and (blocks_resident or budget_bytes or ram_budget_bytes):
        raise ValueError("devices: a split over several GPUs takes its budgets from gpu_budgets_gb (one per "
                         "device; what fits on no device streams from pinned RAM), not from blocks_resident, "
                         "gpu_budget_gb or ram_budget_gb: leave those at 0")
    if ram_budget_bytes and not blocks_resident:
        raise ValueError("ram_budget_gb: the disk tier is part of headroom's block streaming; set blocks_resident "
                         "(how many blocks stay on the GPU) as well, or ram_budget_gb to 0")
    import comfy.sd

    header = read_header(path)
    source_path, cache_written = path, False
    if ram_budget_bytes:
        source_path, cache_written = int8_file_for_disk(header, config)
        if source_path != str(header.path):  # the INT8 cache of a float file
            header = read_header(source_path)
        config = dataclasses.replace(  # streamed as stored: the kept-float layers hold the file's dtype
            config, float_dtype=config.float_dtype or float_dtype_of(header),
            disk_blocks=planned_disk_blocks(header, blocks_resident, ram_budget_bytes))
    metadata, dominant, _ = _file_dtype_summary(header)
    config.file_metadata = metadata
    record = LoadLog(progress=progress)
    record.disk_file = source_path if ram_budget_bytes else None
    record.disk_cache_written = cache_written
    ops = make_int8_ops(config, record)
    options: dict = {"custom_operations": ops}
    if config.float_dtype is not None:
        options["dtype"] = config.float_dtype
    elif dominant in FP8_DTYPES or dominant == torch.int8:
        # ComfyUI would pick the file's storage dtype for the layers it keeps; theirs must stay float.
        from comfy import model_management

        options["dtype"] = model_management.unet_dtype(supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    start = time.perf_counter()
    base = comfy.sd.load_diffusion_model(source_path, model_options=options, disable_dynamic=True)
    record.seconds = time.perf_counter() - start
    record.fused_blocks = install_fused_blocks(base.model.diffusion_model, config.fuse_blocks, config.compute)
    disk = source_for(source_path, base.model.diffusion_model) if ram_budget_bytes else None
    reinit = (reload_int8_diffusion_model, (path, config, budget_bytes, blocks_resident, tuple(devices),
                                            tuple(device_budgets), ram_budget_bytes))
    return adopt_patcher(base, budget_bytes, reinit, blocks_resident, devices, device_budgets,
                         ram_budget_bytes, disk), record


def reload_int8_diffusion_model(path, config, budget_bytes=0, blocks_resident=0, devices=(), device_budgets=(),
                                ram_budget_bytes=0, disable_dynamic=True):
    """``cached_patcher_init`` target: ComfyUI calls it to build a fresh copy (multi-GPU, deep clones)."""
    return load_int8_diffusion_model(path, config, budget_bytes, blocks_resident=blocks_resident, devices=devices,
                                     device_budgets=device_budgets, ram_budget_bytes=ram_budget_bytes)[0]


def load_int8_text_encoder(paths: Sequence[str], clip_type, config: Int8LoadConfig, model_options: dict | None = None,
                           embedding_directory=None, progress: Callable[[int, int], None] | None = None):
    """``(CLIP, LoadLog)``: ComfyUI's text encoder(s) with INT8 linear layers (``te_model_options`` hook)."""
    import comfy.sd

    metadata, _, _ = _file_dtype_summary(read_header(paths[0]))
    if tuple(config.default_skips) == NATIVE_SKIP_PATTERNS:
        config = dataclasses.replace(config, default_skips=TEXT_ENCODER_SKIP_PATTERNS)
    config.file_metadata = metadata
    record = LoadLog(progress=progress)
    options = dict(model_options or {})
    options["custom_operations"] = make_int8_ops(config, record)
    start = time.perf_counter()
    clip = comfy.sd.load_clip(ckpt_paths=list(paths), embedding_directory=embedding_directory,
                              clip_type=clip_type, model_options=options, disable_dynamic=True)
    record.seconds = time.perf_counter() - start
    clip.patcher = adopt_patcher(clip.patcher, 0, (reload_int8_text_encoder_patcher,
                                                   (tuple(paths), clip_type, config, model_options, embedding_directory)))
    return clip, record


def reload_int8_text_encoder_patcher(paths, clip_type, config, model_options=None, embedding_directory=None,
                                     disable_dynamic=True):
    return load_int8_text_encoder(paths, clip_type, config, model_options, embedding_directory)[0].patcher


def budget_from_gb(gb: float) -> int:
    return 0 if not gb or gb <= 0 else int(gb * GB)
