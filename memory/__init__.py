"""Budgets, smart offload, block streaming, soft/force unload and the MemoryTracker (no ComfyUI import).

Public API (see docs/memory.md):

* :class:`MemoryTracker` - peak VRAM per device, peak RSS, wall time of a run.
* :func:`estimate_inference_vram_gb`, :func:`should_offload`, :func:`record_run` - seed 000's smart offload.
* :func:`plan_placement`, :func:`default_budget_bytes`, :func:`default_ram_budget_bytes` - what lives where
  (GPU / pinned RAM / disk) under VRAM and RAM budgets; :mod:`.disk` reads disk blocks, :mod:`.doctor` reports.
* :func:`enable_block_streaming` / :func:`disable_block_streaming` / :func:`streamer_of` - block streaming.
* :func:`graph_blocks` - replay blocks from CUDA graphs (also ``enable_block_streaming(..., cuda_graphs=True)``).
* :func:`enable_multi_device` / :func:`disable_multi_device` / :func:`split_of` - one model split across devices.
* :func:`soft_unload`, :func:`restore` - park a model in pinned RAM and back.
* :func:`force_unload`, :func:`register_cache` - give VRAM back (also after an OOM).
"""

from .blocks import find_block_lists, resolve_blocks
from .budgets import parse_gpu_budgets, plan_for_gpus
from .graphs import BlockGraphs, graph_blocks
from .estimate import (
    CalibrationStore,
    OffloadDecision,
    estimate_for_model,
    estimate_inference_vram_gb,
    megapixels,
    record_run,
    should_offload,
)
from .multi_device import MultiDeviceSplit, disable_multi_device, enable_multi_device, split_of
from .disk import DiskTierError, SafetensorsSource
from .planner import PlacementPlan, PlanError, default_budget_bytes, default_ram_budget_bytes, plan_placement
from .streaming import BlockStreamer, disable_block_streaming, enable_block_streaming, streamer_of
from .tensors import UnsupportedModuleError, module_bytes
from .tracker import MemoryReport, MemoryTracker
from .unload import (
    ForceUnloadReport,
    SoftUnloadHandle,
    force_unload,
    register_cache,
    release_pinned,
    restore,
    soft_unload,
    unregister_cache,
)

__all__ = [
    "BlockGraphs",
    "BlockStreamer",
    "CalibrationStore",
    "DiskTierError",
    "SafetensorsSource",
    "default_ram_budget_bytes",
    "ForceUnloadReport",
    "MemoryReport",
    "MemoryTracker",
    "MultiDeviceSplit",
    "OffloadDecision",
    "PlacementPlan",
    "PlanError",
    "SoftUnloadHandle",
    "UnsupportedModuleError",
    "default_budget_bytes",
    "disable_block_streaming",
    "disable_multi_device",
    "parse_gpu_budgets",
    "plan_for_gpus",
    "enable_block_streaming",
    "enable_multi_device",
    "estimate_for_model",
    "estimate_inference_vram_gb",
    "find_block_lists",
    "graph_blocks",
    "force_unload",
    "megapixels",
    "module_bytes",
    "plan_placement",
    "record_run",
    "register_cache",
    "release_pinned",
    "resolve_blocks",
    "restore",
    "should_offload",
    "soft_unload",
    "split_of",
    "streamer_of",
    "unregister_cache",
]
