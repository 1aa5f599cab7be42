"""Budget loaders for transformers models with remote code (HunyuanImage-3): INT8 / NF4 / BF16.

One function, :func:`load_hf_model`, does what the community HunyuanImage-3 loaders did,
with the failure modes fixed:
- skip list resolved against the real module tree (``bnb.py``), verified again after loading
  through the dtype report (no "colourful noise" from a VAE that slipped into INT8);
- ``device_map="auto"`` + ``max_memory`` from the budget with ``llm_int8_enable_fp32_cpu_offload=False``;
  when the quantized model does not fit the budget, an explicit map that keeps every quantized layer on
  the GPU (``placement.py``) instead of bitsandbytes' "Some modules are dispatched on the CPU";
- BF16: the part that does not fit is streamed by our block streaming (pinned, prefetched), not by
  accelerate's synchronous hooks;
- pre-quantized folders (``quantization_method``: ``bitsandbytes_int8_full`` / ``bitsandbytes_int8`` /
  ``bitsandbytes_nf4``) load without quantizing again; critical layers of a "full" folder are
  dequantized to bf16;
- the generation config's custom fields are restored (``generate_image`` reads them);
- remote code written for transformers 4.x is shimmed for 5.x (``compat.py``); Tencent's code is refused at
  load time, with the reason and the pip command that works, where the shims cannot bridge it;
- INT8 on our own engine by default (``int8_engine="headroom"``, :mod:`.int8_engine`): W8A8 layers and stacked
  experts, quantized while loading, no bitsandbytes; every engine runs the mask-free MoE forward (:mod:`.moe`);
- load telemetry: wall time, peak process RSS, peak VRAM, dtype report, placement summary.

No ComfyUI import here: the nodes call this, and so can a script.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ...quant.bnb_layers import is_bnb_quantized
from ...quant.report import DtypeReport, dtype_report, is_quantized_layer
from ...quant.skip import DEFAULT_SKIP_PATTERNS, matching_pattern
from ...units import GB
from .bnb import (
    SkipPlan,
    bnb_config,
    bnb_int8_dequantize,
    bnb_skip_modules,
    cast_notice_once,
    convertible_linears,
    hunyuan3_skip_patterns,
    plan_skips,
    quantized_bytes_per_param,
)
from .folder import (
    CONFIG,
    GENERATION_CONFIG,
    QUANTIZATION_METHODS,
    check_generation_config,
    check_int8_shapes,
    check_model_folder,
    check_tokenizer_files,
    detect_quantization_method,
    int8_layers_on_disk,
    read_json_object,
    remote_code_modules,
    safetensors_metadata,
    weight_files,
)
from .inputs import (
    INT8_ENGINES,
    MODES,
    LoaderError,
    check_choice,
    check_load_numbers,
    check_ram_budget,
    first_line,
    packages_for,
    require_packages,
)
from .placement import LAYERS_PREFIX, PlacementSummary

if TYPE_CHECKING:
    from ...memory.multi_device import MultiDeviceSplit
    from ...memory.streaming import BlockStreamer

log = logging.getLogger("comfyui_headroom")

# The versions Tencent's code runs under (checked on an H100; see docs/hunyuan3.md).
TENCENT_PIP_COMMAND = 'pip install "transformers==4.57.1" "huggingface-hub==0.36.0" "diffusers>=0.35,<0.36"'


class MapRejected(RuntimeError):
    """bitsandbytes refused a device map that puts quantized layers on the CPU."""


@dataclass(slots=True)
class LoadedModel:
    """A loaded model plus everything the generators and the status line need.

    Only the fields below exist (slots): whoever needs more state on it declares a field here."""

    model: nn.Module | None  # None once released (post_action "unload"); ensure_loaded loads it again
    path: str
    mode: str
    budget_bytes: int | None
    reserve_gb: float
    external_vram_gb: float
    dtype_report: DtypeReport
    placement: PlacementSummary
    skip_plan: SkipPlan | None = None
    quantization_method: str | None = None  # what the folder said (pre-quantized), None for float folders
    critical_layers: str = ""  # what happened to the critical layers
    tencent_code: bool = False
    restored_generation_fields: list[str] = field(default_factory=list)
    telemetry: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    streamer: BlockStreamer | None = None  # BF16 on one GPU: streams the decoder layers beyond the budget
    split: MultiDeviceSplit | None = None  # BF16 with gpu_budgets_gb: the layers split over the GPUs
    budget_override_streamer: BlockStreamer | None = None  # generate: this run's budget_override_gb only
    fingerprint: str = ""
    parked: torch.device | None = None  # set while soft-unloaded: the device to restore it to
    on_unload: Callable[[], None] | None = None  # called by post_action "unload" (the node's cache drops it)
    load_args: dict = field(default_factory=dict)  # how to load it again after an unload
    cache_key: Any = None  # the node cache's key (nodes/hunyuan3_nodes.py)
    engine: str = ""  # who runs the weights: headroom-int8 | bitsandbytes-int8 | bitsandbytes-nf4 | bf16
    moe: dict = field(default_factory=dict)  # MoE layers per engine (integrations/hunyuan3/moe.moe_engines)
    loras: list = field(default_factory=list)  # the LoRA stack, [LoraEntry(path, strength, ...)] (lora.py)
    ram_budget_bytes: int | None = None  # ram_budget_gb > 0: host RAM for the streamed decoder layers (disk tier)
    tier_plan: Any = None  # the disk tier's PlacementPlan (memory/planner.py), None without ram_budget_gb

    @property
    def placement_owner(self) -> BlockStreamer | MultiDeviceSplit | None:
        """The streamer or split that decides where the weights are, if any: soft unload, save and a per-run
        budget leave such a model alone."""
        return self.streamer if self.streamer is not None else self.split

    def release(self) -> None:
        """Drop the weights (post_action "unload"); ComfyUI may still cache this object, so the next run
        reloads through :func:`ensure_loaded`."""
        owner = self.placement_owner
        if owner is not None:
            try:
                if hasattr(owner, "disk_reader"):  # a BlockStreamer: disk layers are not read back to be dropped
                    owner.disable(load_disk_blocks=False)
                else:
                    owner.disable()
            except Exception:  # the weights go anyway
                pass
        self.streamer = self.split = None
        self.model = None
        self.parked = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def tiers_text(self) -> str:
        """Where the decoder layers live with the disk tier (ram_budget_gb), and the disk read rate of the last
        runs; "" for a model without a disk tier."""
        streamer = self.streamer
        if self.tier_plan is None or streamer is None or not hasattr(streamer, "tier_counts"):
            return ""
        tiers = streamer.tier_counts()
        where = "on the GPU" if streamer.device.type == "cuda" else f"resident on {streamer.device}"
        text = (f"decoder layers: {tiers['gpu']} {where}, {tiers['ram']} in RAM, {tiers['disk']} on disk "
                f"(RAM budget {(self.ram_budget_bytes or 0) / GB:.2f} GB, {streamer.host_bytes / GB:.2f} GB used)")
        reader = streamer.disk_reader
        if reader is not None and reader.stats.reads:
            rate = reader.stats.gb_per_s
            text += (f"; disk read {reader.stats.bytes_read / GB:.2f} GB in {reader.stats.reads} layer reads"
                     + (f" at {rate:.2f} GB/s" if rate else "") + f", waited {reader.stats.wait_s:.1f}s")
        return text

    def summary(self) -> str:
        engine = f" ({self.engine})" if self.engine else ""
        lines = [f"{self.mode.upper()} model{engine} from {self.path}"]
        if self.quantization_method:
            lines.append(f"pre-quantized ({self.quantization_method}): {self.critical_layers}")
        elif self.critical_layers:
            lines.append(self.critical_layers)
        lines.append(str(self.dtype_report))
        if self.moe:
            lines.append("MoE layers: " + ", ".join(f"{n} {engine}" for engine, n in sorted(self.moe.items())))
        lines.append(str(self.placement))
        tiers = self.tiers_text()
        if tiers:
            lines.append(tiers)
        t = self.telemetry
        if t:
            vram = f", peak VRAM {t['peak_vram_bytes'] / GB:.2f} GB" if t.get("peak_vram_bytes") else ""
            lines.append(f"load: {t.get('wall_s', 0):.1f}s, peak RAM {t.get('peak_rss_bytes', 0) / GB:.2f} GB{vram}")
        lines.extend(self.notes)
        return "\n".join(lines)


# ------------------------------------------------------------------------------ remote code


def build_skeleton(folder, config_obj, trust_remote_code: bool, attn_implementation: str | None):
    """The model on the meta device: module names, shapes and the remote module, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .compat import prepare_transformers5_import

    prepare_transformers5_import()  # names 5.x removed that remote 4.x code imports, put back before its import
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights():
        try:
            return AutoModelForCausalLM.from_config(config_obj, dtype=torch.bfloat16, **kwargs)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError) as err:
            if attn_implementation and "attn" in str(err).lower():
                raise LoaderError(f"{folder}: attention implementation {attn_implementation!r} is not supported "
                                  f"by this model ({first_line(err)}); pick 'sdpa' or 'eager'") from None
            # the folder's config.json values, read by the folder's own code (a wrong type, a negative size ...)
            raise LoaderError(f"{Path(folder) / CONFIG}: the model's code cannot build the model from it "
                              f"({first_line(err)}); re-download config.json and the model's *.py files") from None


def is_tencent_code(model: nn.Module) -> bool:
    """Tencent's HunyuanImage-3 modeling code defines ``HunyuanStaticCache`` in the model's module."""
    import sys

    module = sys.modules.get(type(model).__module__)
    return module is not None and hasattr(module, "HunyuanStaticCache")


def check_transformers_version(skeleton: nn.Module, folder) -> None:
    """Remote code written for transformers 4.x is shimmed for 5.x here (``compat.py``: any model, keyed on the
    API it uses). Tencent's code is then refused, before a weight is read, where it could not run: without CUDA,
    and under a transformers whose API the shims cannot bridge for it (a major version after 5, or a
    ``HunyuanStaticCache`` that fails the cache probe) - with the reason and the command that gives a working
    environment, instead of a traceback in the middle of a generation."""
    _shim_for_transformers5(skeleton)
    if not is_tencent_code(skeleton):
        return
    if not torch.cuda.is_available():
        raise LoaderError(f"{folder}: Tencent's HunyuanImage-3 code runs on CUDA only (CUDA autocast, "
                          "torch.cuda.set_device in its MoE); this machine has no CUDA device")
    from .compat import transformers5_blockers

    blockers = transformers5_blockers(skeleton, required_caches=("HunyuanStaticCache",))
    if blockers:
        import transformers

        raise LoaderError(
            f"{folder}: Tencent's HunyuanImage-3 code cannot run under transformers {transformers.__version__}: "
            f"{'; '.join(blockers)} (generation would fail midway). Install the versions it was written for, in "
            f"ComfyUI's Python: {TENCENT_PIP_COMMAND}")


def _shim_for_transformers5(model: nn.Module) -> list[str]:
    """The transformers 5.x shims for remote code written against 4.x (``compat.py``; nothing under 4.x, nothing
    applied twice); returns load-report lines for the shims in effect on ``model``."""
    from .compat import apply_transformers5_shims

    return [f"transformers 5.x shim: {line}" for line in apply_transformers5_shims(model)]


def restore_generation_config(model: nn.Module, folder) -> list[str]:
    """Copy generation_config.json's custom fields (``use_system_prompt``, ``bot_task``, ``diff_infer_steps``
    ...) onto ``model.generation_config`` where transformers dropped them; returns the restored names."""
    data = read_json_object(Path(folder) / GENERATION_CONFIG)
    gen = getattr(model, "generation_config", None)
    if not data:
        return []
    if gen is None:
        from transformers import GenerationConfig

        gen = model.generation_config = GenerationConfig()
    restored = []
    for key, value in data.items():
        if key.startswith("_") or key == "transformers_version":
            continue
        if getattr(gen, key, None) is None and value is not None:
            setattr(gen, key, value)
            restored.append(key)
    if restored:
        log.info("generation config: restored %s from generation_config.json", ", ".join(restored))
    return restored


# ------------------------------------------------------------------------------ the loader


def cuda_device_info(device: int = 0) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free, total


@dataclass
class _LoadPlan:
    """One load's decisions, all made before a weight is read: what stays float, where the weights go, what
    runs after ``from_pretrained``. The planning steps of :func:`load_hf_model` fill it in order."""

    mode: str  # int8 | nf4 | bf16 (a pre-quantized folder's own)
    method: str | None  # the folder's quantization_method, None for a float folder
    patterns: list[str]  # skip patterns: what they name stays full precision
    skips: SkipPlan
    critical_note: str = ""  # what happens to the critical layers of a pre-quantized folder
    dequantize: list[str] = field(default_factory=list)  # INT8-Full: critical layers to dequantize after loading
    device_map: str | dict = "auto"  # from_pretrained's device_map ...
    max_memory: dict | None = None  # ... and max_memory
    fp32_offload: bool = False  # an explicit map puts unquantized modules on the CPU
    budget_bytes: int | None = None  # VRAM for weights (all GPUs together)
    gpu_budgets: dict[int, int] | None = None  # gpu_budgets_gb given: {gpu index: bytes}
    stream_resident: int | None = None  # BF16 on one GPU: stream the decoder layers after the first N
    split: bool = False  # BF16 over several GPUs: split the decoder layers over ``gpu_budgets`` after loading
    tiers: Any = None  # ram_budget_gb: the three-tier PlacementPlan of the decoder layers (disk_tier.plan_tiers)
    disk_source: Any = None  # ... and the SafetensorsSource its disk layers stream from
    stream_device: torch.device | None = None  # ... and the device they stream onto
    notes: list[str] = field(default_factory=list)


def load_hf_model(path, mode: str = "int8", budget_gb: float = 0.0, external_vram_gb: float = 0.0,
                  trust_remote_code: bool = False, attn_implementation: str | None = "sdpa",
                  device_map: str | dict = "auto", gpu_layers: int | None = None,
                  skip: Sequence[str] | str | None = None, keep_attention: bool = True, device: int = 0,
                  reserve_gb: float | None = None, skip_patterns: Sequence[str] | None = None,
                  gpu_budgets_gb: str = "", int8_engine: str = "headroom", ram_budget_gb: float = 0.0) -> LoadedModel:
    """Load a transformers model folder under a VRAM budget.

    ``mode``: ``int8`` / ``nf4`` (bitsandbytes) or ``bf16``; a pre-quantized folder decides it itself.
    ``budget_gb``: VRAM for weights (0 = 55 % of the card). ``device_map``: "auto" (from the budget),
    "manual" (critical modules + the first ``gpu_layers`` decoder layers on the GPU) or an explicit dict,
    which is validated before loading. ``skip``: extra skip patterns on top of the HunyuanImage-3 defaults;
    ``skip_patterns`` replaces the whole list (``[]`` quantizes every Linear: how INT8-Full folders are made).
    ``gpu_budgets_gb``: several GPUs, one budget each (``"40,40"``; one number = that on every GPU) - the
    INT8/NF4 model is spread over them by accelerate's ``device_map="auto"`` with one ``max_memory`` entry per
    GPU (issue #9); it replaces ``budget_gb``. Checked before anything is loaded.
    ``int8_engine`` (mode ``int8``): ``headroom`` - our W8A8 layers, the attention projections INT8 too, the experts
    stacked for the grouped kernel, quantized while loading (:mod:`.int8_engine`); ``bitsandbytes`` - LLM.int8.
    A bitsandbytes-saved folder loads with bitsandbytes, a ``headroom convert`` folder with ours.
    Every engine runs the mask-free MoE forward (:mod:`.moe`).
    ``ram_budget_gb`` (headroom engine, one device; 0 = no RAM limit): host RAM for the decoder layers that do not
    fit the VRAM budget; the ones beyond it stay on disk and stream from the safetensors files on every pass - as
    stored from a ``headroom convert`` folder, else from an INT8 cache written once next to the model
    (:mod:`.disk_tier`).
    """
    check_choice("mode", mode, MODES)
    check_choice("int8_engine", int8_engine, INT8_ENGINES)
    budget_gb, external_vram_gb, gpu_layers, reserve_gb = check_load_numbers(budget_gb, external_vram_gb, gpu_layers,
                                                                             reserve_gb)
    ram_budget_gb = check_ram_budget(ram_budget_gb)
    folder = Path(path)
    method, mode, files = _resolve_mode(folder, mode, trust_remote_code)
    engine = _choose_engine(folder, files, mode, method, int8_engine)
    if ram_budget_gb and engine != HEADROOM_INT8:
        raise LoaderError(f"ram_budget_gb={ram_budget_gb:g} (the disk tier) needs the headroom INT8 engine; this load "
                          f"runs {engine} - pick int8_engine=headroom on the INT8 loader, or set ram_budget_gb to 0")
    require_packages(packages_for(mode, "headroom" if engine == HEADROOM_INT8 else "bitsandbytes"))
    config, skeleton = _checked_skeleton(folder, trust_remote_code, attn_implementation)
    if skip_patterns is not None:
        patterns = list(skip_patterns)
    else:  # our engine quantizes the attention projections too (the list); bitsandbytes keeps them float
        patterns = hunyuan3_skip_patterns(skip, keep_attention and engine != HEADROOM_INT8)
    if engine == HEADROOM_INT8:
        plan = _LoadPlan(mode="int8", method=None, patterns=patterns,
                         skips=plan_skips(convertible_linears(skeleton), patterns))
        model, telemetry = _load_headroom_int8(folder, files, skeleton, plan, budget_gb, external_vram_gb,
                                               device_map, gpu_layers, device, gpu_budgets_gb, ram_budget_gb)
    else:
        plan = _plan_skips(folder, skeleton, mode, method, patterns)
        _plan_placement(plan, skeleton, budget_gb, external_vram_gb, device_map, gpu_layers, device, gpu_budgets_gb)
        kwargs = _from_pretrained_kwargs(plan, config, trust_remote_code, attn_implementation)
        model, telemetry = _load_weights(folder, plan, kwargs, device, gpu_budgets_gb)
    restored = _finish_model(model, folder, skeleton, plan)
    moe = _mask_free_moe(model, plan.mode, engine)
    streamer, split = _start_streaming_or_split(model, plan, device)
    report = _verified_dtype_report(model, plan)

    if reserve_gb is None:
        # the loader reserve (as in the community loaders): VRAM promised to others, added to the inference
        # estimate in smart mode
        reserve_gb = float(external_vram_gb)
    load_args = dict(path=str(folder), mode=mode, budget_gb=budget_gb, external_vram_gb=external_vram_gb,
                     trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                     device_map=device_map, gpu_layers=gpu_layers, skip=skip, keep_attention=keep_attention,
                     device=device, skip_patterns=skip_patterns, gpu_budgets_gb=gpu_budgets_gb,
                     int8_engine=int8_engine, ram_budget_gb=ram_budget_gb)
    loaded = LoadedModel(model=model, path=str(folder), mode=mode, load_args=load_args, engine=engine, moe=moe,
                         budget_bytes=plan.budget_bytes, reserve_gb=reserve_gb, external_vram_gb=external_vram_gb,
                         dtype_report=report, placement=_placement_summary(model, streamer, split),
                         skip_plan=plan.skips, quantization_method=method, critical_layers=plan.critical_note,
                         tencent_code=is_tencent_code(skeleton), restored_generation_fields=restored,
                         telemetry=telemetry, notes=plan.notes, streamer=streamer, split=split,
                         fingerprint=folder_fingerprint(folder), tier_plan=plan.tiers,
                         ram_budget_bytes=int(ram_budget_gb * GB) if ram_budget_gb else None)
    # What the generators read (the community loaders keep the reserve on the model as ``_loader_reserve_gb``).
    model._loader_reserve_gb = reserve_gb
    model._headroom_budget_bytes = plan.budget_bytes
    log.info("%s", loaded.summary())
    return loaded


# -- the steps of load_hf_model, in order

HEADROOM_INT8 = "headroom-int8"


def _choose_engine(folder: Path, files: Sequence[Path], mode: str, method: str | None, int8_engine: str) -> str:
    """Who runs the weights. A folder's own format decides over the choice: bitsandbytes' saved folders load
    with bitsandbytes, ``headroom convert`` folders with ours (bitsandbytes cannot read them)."""
    if mode != "int8":
        if method is None and _headroom_converted(files):
            raise LoaderError(f"{folder} holds headroom INT8 weights (written by headroom convert); {mode.upper()} "
                              "cannot read them - load it with the INT8 loader, or load the float original")
        return mode if mode == "bf16" else f"bitsandbytes-{mode}"
    if method is not None:  # a bitsandbytes-saved folder
        if int8_engine == "headroom":
            log.info("%s was saved by bitsandbytes (%s): loading it with bitsandbytes", folder, method)
        return "bitsandbytes-int8"
    if _headroom_converted(files):
        if int8_engine != "headroom":
            log.info("%s was written by headroom convert: loading it with headroom's INT8 engine", folder)
        return HEADROOM_INT8
    return HEADROOM_INT8 if int8_engine == "headroom" else "bitsandbytes-int8"


def _headroom_converted(files: Sequence[Path]) -> bool:
    """``headroom convert`` wrote these weights (its format version in the first shard's header)."""
    from ...quant.formats.metadata import is_headroom_metadata

    return bool(files) and is_headroom_metadata(safetensors_metadata(files[0]))


def _load_headroom_int8(folder: Path, files: Sequence[Path], skeleton: nn.Module, plan: _LoadPlan, budget_gb: float, external_vram_gb: float,
                        device_map, gpu_layers: int | None, device: int, gpu_budgets_gb: str, ram_budget_gb: float = 0.0):
    """Our INT8 engine (:mod:`.int8_engine`): the skeleton's layers swapped for INT8 ones, placed by their INT8
    sizes, filled tensor by tensor from the files. With ``ram_budget_gb`` the decoder layers beyond the RAM budget
    are not read (they stay on meta) and stream from disk (:mod:`.disk_tier`). Returns (model, load telemetry)."""
    from .int8_engine import allocate, device_for, fill_from_files, swap_in_int8_layers

    if isinstance(device_map, dict):
        raise LoaderError("int8_engine=headroom places the model itself: use device_map 'auto' or 'manual' "
                          "(or int8_engine=bitsandbytes for an explicit map)")
    counts = swap_in_int8_layers(skeleton, plan.skips.quantize)
    plan.notes.append(f"headroom INT8 engine: {counts['linear']} INT8 layers, {counts['stacked_moe']} MoE layers "
                      "with stacked INT8 experts (grouped W8A8 kernel)")
    layers = len(skeleton.get_submodule(LAYERS_PREFIX)) if _has_module(skeleton, LAYERS_PREFIX) else 0
    cpu = torch.device("cpu")
    layer_devices: dict[int, torch.device] = {}
    rest = cpu
    multi_gpu_memory = _multi_gpu_max_memory(gpu_budgets_gb, "bf16", device_map, external_vram_gb)
    info = cuda_device_info(device)
    if multi_gpu_memory is not None and ram_budget_gb:
        raise LoaderError("ram_budget_gb (the disk tier) streams onto one GPU; leave gpu_budgets_gb empty or set "
                          "ram_budget_gb to 0")
    if multi_gpu_memory is not None:
        _plan_several_gpus(plan, multi_gpu_memory)  # into RAM, then split over the GPUs by headroom
        plan.notes[-1] = plan.notes[-1].replace("BF16", "INT8")
    elif info is None and ram_budget_gb:
        # No CUDA (the CPU road, the tests): the layers stream onto the CPU; gpu_budget_gb (or device_map manual's
        # gpu_layers) decides how many stay resident, 0 = none.
        from .placement import bf16_stream_map

        if device_map == "manual":
            resident = gpu_layers or 0
        elif budget_gb:
            _, resident = bf16_stream_map(skeleton, int(budget_gb * GB), "cpu")
        else:
            resident = 0
        layer_devices = _plan_disk_tier(plan, skeleton, cpu, min(resident, layers), ram_budget_gb, layers)
    elif info is None:
        plan.notes.append("no CUDA device: loaded on the CPU")
    else:
        from .placement import bf16_stream_map, resolve_budget

        gpu = torch.device("cuda", device)
        plan.budget_bytes = resolve_budget(budget_gb, info[1]) - int(external_vram_gb * GB)
        if plan.budget_bytes <= 0:
            raise LoaderError(f"GPU budget {budget_gb} GB minus external VRAM {external_vram_gb} GB leaves nothing "
                              "for weights; raise the budget or lower external_vram_gb")
        fixed = gpu_layers if device_map == "manual" else None
        _, resident = bf16_stream_map(skeleton, plan.budget_bytes, device, gpu_layers=fixed)
        resident = min(resident, layers)
        rest = gpu
        layer_devices = {i: gpu if i < resident else cpu for i in range(layers)}
        if ram_budget_gb:
            layer_devices = _plan_disk_tier(plan, skeleton, gpu, resident, ram_budget_gb, layers)
        elif resident < layers:
            plan.stream_resident = resident
            plan.notes.append(f"INT8 budget {plan.budget_bytes / GB:.2f} GB: {resident} of {layers} decoder layers "
                              "on the GPU, the others stream from pinned RAM")
    work = torch.device("cuda", device) if info is not None else cpu
    disk_layers = [f"{LAYERS_PREFIX}.{i}" for i, dev in sorted(layer_devices.items()) if dev is None]
    tracker = _tracker()
    try:
        with tracker:
            allocated = allocate(skeleton, device_for(layer_devices, rest, LAYERS_PREFIX))
            counts = fill_from_files(skeleton, files, allocated, work, folder,
                                     skip=tuple(f"{n}." for n in disk_layers))
            if disk_layers:
                from .disk_tier import disk_source

                plan.disk_source, notes = disk_source(folder, files, skeleton, disk_layers, plan.skips.quantize, work)
                plan.notes.extend(notes)
    except torch.OutOfMemoryError as err:
        raise LoaderError(load_oom_message(folder, plan, ram_budget_gb, err)) from None
    report = getattr(tracker, "report", None)
    telemetry = report.as_dict() if report is not None else {}
    telemetry.update(counts)
    if counts["read_as_int8"]:
        plan.notes.append(f"{counts['read_as_int8']} layers read as INT8 from a headroom convert folder")
    _load_generation_config(skeleton, folder)
    skeleton.eval()
    return skeleton, telemetry


def _plan_disk_tier(plan: _LoadPlan, skeleton: nn.Module, device: torch.device, resident: int, ram_budget_gb: float,
                    layers: int) -> dict[int, torch.device | None]:
    """ram_budget_gb: the decoder layers' three tiers (:func:`.disk_tier.plan_tiers`); -> layer devices (None:
    on disk, never allocated)."""
    from .disk_tier import layer_index, plan_tiers

    tiers = plan_tiers(skeleton, device, resident, int(ram_budget_gb * GB), LAYERS_PREFIX)
    plan.tiers, plan.stream_device = tiers, device
    on_disk = {layer_index(n) for n in tiers.disk_blocks()}
    counts = tiers.tier_counts()
    plan.notes.append(f"INT8 disk tier (RAM budget {ram_budget_gb:g} GB): {counts['gpu']} of {layers} decoder layers "
                      f"resident on {device}, {counts['ram']} stream from RAM, {counts['disk']} from disk")
    cpu = torch.device("cpu")
    return {i: None if i in on_disk else device if i < resident else cpu for i in range(layers)}


def load_oom_message(folder: Path, plan: _LoadPlan, ram_budget_gb: float, err: BaseException) -> str:
    """An out-of-memory error while loading: what happened, the plan, and what to change (memory/doctor.py)."""
    from ...memory.doctor import oom_advice

    lines = [f"{folder}: out of memory while loading ({first_line(err)})"]
    if plan.tiers is not None:
        lines += ["the plan of the decoder layers:", str(plan.tiers)]
    lines.append(oom_advice(folder, plan.budget_bytes, int(ram_budget_gb * GB) if ram_budget_gb else None))
    return "\n".join(lines)


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """What ``from_pretrained`` does for the generation config (built models start from the defaults); the custom
    fields transformers drops come back in :func:`restore_generation_config`."""
    if not (folder / GENERATION_CONFIG).is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:  # checked before loading; say so rather than fail here
        log.warning("%s: transformers could not read it (%s); the custom fields are restored from the file",
                    folder / GENERATION_CONFIG, first_line(err))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _mask_free_moe(model: nn.Module, mode: str, engine: str) -> dict[str, int]:
    """Every engine runs our mask-free MoE forward: INT8 experts are already stacked, bf16 ones are stacked for
    ``torch._grouped_mm``, bitsandbytes experts keep their per-expert layers."""
    from .moe import moe_engines, replace_moe

    stack = "bf16" if mode == "bf16" else None
    replace_moe(model, stack=stack)
    counts = moe_engines(model)
    if counts:
        log.info("MoE layers: %s", counts)
    return counts



def _resolve_mode(folder: Path, mode: str, trust_remote_code: bool) -> tuple[str | None, str, list[Path]]:
    """Check the folder's files (config.json and consent for its code, the weights' index and headers, the
    tokenizer's JSON; ``folder.py``); a pre-quantized folder decides the mode itself. Returns (its
    quantization_method or None, the mode to load in, the checked weight files)."""
    config = check_model_folder(folder, trust_remote_code)
    files = weight_files(folder)
    method = detect_quantization_method(folder, config, files)
    check_tokenizer_files(folder)
    if method:
        disk_mode = QUANTIZATION_METHODS[method]
        if mode != disk_mode:
            log.info("%s is pre-quantized (%s): loading as %s, not %s", folder, method, disk_mode, mode)
        mode = disk_mode
    return method, mode, files


def _checked_skeleton(folder: Path, trust_remote_code: bool, attn_implementation: str | None):
    """The config and the model on the meta device (names and shapes for planning); Tencent's code is refused
    here where it could not run, and a model whose ``generate_image`` reads generation_config.json needs that
    file. Returns (config, skeleton)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, SyntaxError) as err:
        code = remote_code_modules(folder, (read_json_object(folder / CONFIG) or {}).get("auto_map"))
        files = ", ".join(str(folder / f"{m}.py") for m in code) or "no code"
        raise LoaderError(f"{folder / CONFIG} (its code: {files}): transformers cannot build the model's config from "
                          f"them ({first_line(err)}); re-download the model folder") from None
    skeleton = build_skeleton(folder, config, trust_remote_code, attn_implementation)
    check_transformers_version(skeleton, folder)
    check_generation_config(folder, required=callable(getattr(skeleton, "generate_image", None)))
    return config, skeleton


def _plan_skips(folder: Path, skeleton: nn.Module, mode: str, method: str | None, patterns: list[str]) -> _LoadPlan:
    """Which Linear layers stay float: resolved against the skeleton (and, pre-quantized, against the files)."""
    skips = bnb_skip_modules(skeleton, patterns) if mode != "bf16" else plan_skips([], patterns)
    plan = _LoadPlan(mode=mode, method=method, patterns=patterns, skips=skips)
    if method:
        plan.skips, plan.critical_note, plan.dequantize = _plan_for_prequantized(folder, skeleton, method, skips)
    return plan


def _plan_placement(plan: _LoadPlan, skeleton: nn.Module, budget_gb: float, external_vram_gb: float, device_map,
                    gpu_layers: int | None, device: int, gpu_budgets_gb: str) -> None:
    """Where the weights go (several GPUs, no GPU, or one GPU under its budget); bad combinations fail here,
    before a weight is read."""
    multi_gpu_memory = _multi_gpu_max_memory(gpu_budgets_gb, plan.mode, device_map, external_vram_gb)
    if multi_gpu_memory is not None:
        _plan_several_gpus(plan, multi_gpu_memory)
        return
    info = cuda_device_info(device)
    if info is None:
        # No CUDA (CI, CPU-only machines): everything on the CPU; bitsandbytes uses its CPU backend.
        plan.device_map = {"": "cpu"}
        plan.notes.append("no CUDA device: loaded on the CPU")
        return
    _plan_one_gpu(plan, skeleton, info[1], budget_gb, external_vram_gb, device_map, gpu_layers, device)


def _multi_gpu_max_memory(gpu_budgets_gb: str, mode: str, device_map, external_vram_gb: float) -> dict | None:
    """``max_memory`` for ``gpu_budgets_gb`` (None when it is empty); bad combinations fail before loading."""
    if not (gpu_budgets_gb or "").strip():
        return None
    if device_map != "auto":
        raise LoaderError(f"gpu_budgets_gb={gpu_budgets_gb!r} places the model by itself: leave device_map at "
                          f"'auto' (got {device_map!r})")
    from .placement import max_memory_for_budgets

    try:
        return max_memory_for_budgets(gpu_budgets_gb, external_vram_gb=external_vram_gb)
    except ValueError as err:  # parse errors and the planner's PlanError (a ValueError) alike
        raise LoaderError(str(err)) from None


def _plan_several_gpus(plan: _LoadPlan, max_memory: dict) -> None:
    """INT8/NF4: accelerate spreads the model over the GPUs by ``max_memory``. BF16: our placement, not
    accelerate's hooks - load into RAM, then split the decoder layers over the GPUs (memory/multi_device.py);
    layers that fit on no GPU stream from pinned RAM onto the last one."""
    plan.gpu_budgets = {k: v for k, v in max_memory.items() if k != "cpu"}
    plan.budget_bytes = sum(plan.gpu_budgets.values())
    per_gpu = ", ".join(f"cuda:{k} <= {v / GB:.1f} GB" for k, v in plan.gpu_budgets.items())
    if plan.mode == "bf16":
        plan.device_map = {"": "cpu"}
        plan.split = True
        plan.notes.append(f"BF16 loaded into RAM, then split over {per_gpu} by headroom")
    else:
        plan.device_map, plan.max_memory = "auto", max_memory
        plan.notes.append(f"spread over {per_gpu} by accelerate's device_map='auto'")


def _plan_one_gpu(plan: _LoadPlan, skeleton: nn.Module, total: int, budget_gb: float, external_vram_gb: float,
                  device_map, gpu_layers: int | None, device: int) -> None:
    """One GPU: the budget (minus VRAM held by others), then the map - BF16 beyond it streams, INT8/NF4 keep
    every quantized layer on the GPU (bitsandbytes cannot offload them)."""
    from .placement import max_memory_for_budget, resolve_budget

    plan.budget_bytes = resolve_budget(budget_gb, total) - int(external_vram_gb * GB)
    if budget_gb * GB > total:
        plan.notes.append(f"gpu_budget_gb {budget_gb:g} is above this card's {total / GB:.1f} GB: clamped to the card, "
                          "which leaves no VRAM for inference (0 = 55 % of the card)")
    if plan.budget_bytes <= 0:
        raise LoaderError(f"GPU budget {budget_gb} GB minus external VRAM {external_vram_gb} GB leaves nothing "
                          "for weights; raise the budget or lower external_vram_gb")
    chosen = _choose_device_map(plan, skeleton, device_map, gpu_layers, device)
    if plan.mode == "bf16":
        _plan_bf16_streaming(plan, skeleton, chosen, device_map, device)
    elif chosen == "auto":
        plan.device_map = "auto"
        plan.max_memory = max_memory_for_budget(plan.budget_bytes / GB, device, total)
    else:
        _plan_explicit_quantized_map(plan, chosen)


def _choose_device_map(plan: _LoadPlan, skeleton: nn.Module, device_map, gpu_layers: int | None,
                       device: int) -> str | dict:
    """The caller's map (validated), the community loaders' manual map, or "auto" - a map that keeps quantized
    layers on the GPU when the budget is too small for all of it."""
    from .placement import manual_device_map, plan_quantized_map, validate_device_map

    if isinstance(device_map, dict):
        validate_device_map(device_map, skeleton)
        return dict(device_map)
    if device_map == "manual":
        if gpu_layers is None:
            raise LoaderError("device_map='manual' needs gpu_layers (how many decoder layers stay on the GPU)")
        return manual_device_map(skeleton, gpu_layers, device)
    if device_map == "auto":
        quantized = set(plan.skips.quantize)
        bpp = quantized_bytes_per_param(plan.mode) if plan.mode != "bf16" else 2.0
        qplan = plan_quantized_map(skeleton, plan.budget_bytes, lambda n: n in quantized, bpp, device)
        plan.notes.extend(qplan.notes)
        return "auto" if not qplan.needs_fp32_cpu_offload else qplan.device_map
    raise LoaderError(f"device_map must be 'auto', 'manual' or a dict, got {device_map!r}")


def _plan_bf16_streaming(plan: _LoadPlan, skeleton: nn.Module, chosen: str | dict, device_map, device: int) -> None:
    """Our streaming, not accelerate's hooks: everything that is not a decoder layer and as many layers as the
    budget holds load straight to the GPU, the rest straight into RAM, streamed from pinned memory afterwards
    (memory/streaming.py). A map (manual, or the auto plan's) decides the resident layers itself."""
    from .placement import bf16_stream_map

    model_bytes = sum(t.numel() * t.element_size() for t in skeleton.parameters())
    if device_map == "auto" and model_bytes <= plan.budget_bytes:
        plan.device_map = {"": device}  # fits: straight to the GPU, no streaming
        return
    fixed = None
    if isinstance(chosen, dict):
        fixed = sum(1 for u, d in chosen.items() if u.startswith("model.layers.") and d != "cpu")
    load_map, resident = bf16_stream_map(skeleton, plan.budget_bytes, device, gpu_layers=fixed)
    plan.device_map = load_map
    if any(d == "cpu" for d in load_map.values()):
        plan.stream_resident = resident
        plan.notes.append(f"BF16 model {model_bytes / GB:.2f} GB, budget {plan.budget_bytes / GB:.2f} GB: "
                          f"{resident} decoder layers on the GPU, the others stream from pinned RAM")


def _plan_explicit_quantized_map(plan: _LoadPlan, chosen: dict) -> None:
    """INT8/NF4 with a map that puts modules on the CPU: the quantizable layers there stay unquantized (bitsandbytes'
    fp32 CPU offload), which the skip plan then says."""
    cpu_quantized = [u for u, d in chosen.items()
                     if d == "cpu" and any(q == u or q.startswith(u + ".") for q in plan.skips.quantize)]
    if cpu_quantized:
        plan.notes.append(f"{len(cpu_quantized)} modules with quantizable layers are mapped to the CPU; they stay "
                          f"in bf16 there (bitsandbytes keeps CPU-offloaded layers unquantized): "
                          f"{', '.join(cpu_quantized[:4])}{' ...' if len(cpu_quantized) > 4 else ''}")
        plan.skips = _drop_from_quantize(plan.skips, cpu_quantized)
    plan.fp32_offload = any(d == "cpu" for d in chosen.values())
    plan.device_map = chosen


def _from_pretrained_kwargs(plan: _LoadPlan, config, trust_remote_code: bool, attn_implementation: str | None) -> dict:
    """``from_pretrained``'s arguments for the plan (placement, then the bitsandbytes config)."""
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                  device_map=plan.device_map)
    if plan.max_memory is not None:
        kwargs["max_memory"] = plan.max_memory
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if plan.mode != "bf16":
        _apply_quantization_kwargs(kwargs, config, plan.method, plan.mode, plan.skips, plan.fp32_offload)
    else:
        kwargs["config"] = config
    return kwargs


def _load_weights(folder: Path, plan: _LoadPlan, kwargs: dict, device: int, gpu_budgets_gb: str):
    """``from_pretrained`` as planned; returns (model, load telemetry). bitsandbytes refusing the map becomes
    advice - or, for transformers' own "auto" map that spilled where our plan said all fits, an all-GPU load."""
    try:
        model, telemetry = _from_pretrained_tracked(folder, kwargs)
        if plan.stream_resident is not None:
            model = _take_back_offloaded(model, folder, kwargs, telemetry, plan.notes)
        return model, telemetry
    except MapRejected:
        if plan.gpu_budgets is not None:
            raise LoaderError(f"{folder}: the {plan.mode.upper()} model does not fit gpu_budgets_gb={gpu_budgets_gb!r} "
                              "(bitsandbytes refuses quantized layers on the CPU): raise the budgets or use NF4") \
                from None
        if kwargs.get("device_map") != "auto":
            raise LoaderError(f"{folder}: bitsandbytes rejected the device map (quantized layers on the CPU). "
                              "Raise the budget, use NF4, or set device_map='manual' with fewer gpu_layers") from None
    # transformers sized the model differently from our plan (it keeps 10 % aside): our plan said it fits, so
    # place everything on the GPU explicitly.
    plan.notes.append("transformers' auto map spilled to the CPU; loaded with the planned all-GPU map instead")
    kwargs.pop("max_memory", None)
    kwargs["device_map"] = {"": device}
    return _from_pretrained_tracked(folder, kwargs)


def _finish_model(model: nn.Module, folder: Path, skeleton: nn.Module, plan: _LoadPlan) -> list[str]:
    """After ``from_pretrained``: INT8-Full's critical layers dequantized, the generation config's custom fields
    and the tokenizer back on the model. Returns the restored generation-config fields."""
    if plan.dequantize:
        dtypes = {n: skeleton.get_submodule(n).weight.dtype for n in plan.dequantize}
        dequantized = dequantize_critical_layers(model, folder, plan.dequantize, dtypes)
        plan.critical_note += f": {dequantized} layers dequantized INT8 -> bf16"
    log.info("%s", plan.critical_note or "no pre-quantized layers")
    plan.notes.extend(_shim_for_transformers5(model))  # the skeleton's classes already carry them: report only
    restored = restore_generation_config(model, folder)
    if hasattr(model, "load_tokenizer") and any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        try:
            model.load_tokenizer(str(folder))  # Tencent's code: the tokenizer travels with the model
        except Exception as err:  # noqa: BLE001 - the folder's tokenizer files, read by the folder's own code
            raise LoaderError(f"{folder}: its tokenizer files do not load ({first_line(err)}); re-download "
                              "tokenizer.json and tokenizer_config.json from the model's release") from None
    return restored


def _start_streaming_or_split(model: nn.Module, plan: _LoadPlan, device: int):
    """BF16 beyond the budget: our block streaming on one GPU, or the split over several; returns
    (streamer, split), None where the plan has neither."""
    streamer = split = None
    if plan.tiers is not None:
        from ...memory.streaming import enable_block_streaming

        streamer = enable_block_streaming(model, plan.stream_device, blocks=LAYERS_PREFIX, plan=plan.tiers,
                                          disk=plan.disk_source)
        plan.notes.append(f"INT8 streaming: {streamer.summary()}")
    elif plan.stream_resident is not None:
        streamer = _start_streaming(model, device, plan.stream_resident)
        plan.notes.append(f"BF16 streaming: {streamer.summary()}")
    if plan.split:
        from ...memory import enable_multi_device
        from ...memory.budgets import plan_for_gpus

        # HunyuanImage-3's critical modules (the community loaders' skip list) are the planner's critical
        # patterns.
        gpu_plan = plan_for_gpus(model, plan.gpu_budgets, blocks=LAYERS_PREFIX, critical=DEFAULT_SKIP_PATTERNS)
        split = enable_multi_device(model, gpu_plan, blocks=LAYERS_PREFIX)
        plan.notes.append(f"BF16 {split.summary()}")
    return streamer, split


def _verified_dtype_report(model: nn.Module, plan: _LoadPlan) -> DtypeReport:
    """The dtype report, checked: every kept layer float, every planned layer quantized - else the load is wrong."""
    report = dtype_report(model, plan.patterns, plan.skips.keep)
    _check_report(model, plan.skips, report)
    return report


def _placement_summary(model: nn.Module, streamer, split) -> PlacementSummary:
    """Where the weights are now, and who moves them."""
    from .placement import describe_placement

    placement = describe_placement(model)
    if streamer is not None:
        placement.offloaded_by = "headroom-streaming"
    elif split is not None:
        placement.offloaded_by = "headroom-multi-device"
    log.info("%s", placement)
    return placement


def ensure_loaded(loaded: LoadedModel) -> bool:
    """Reload a model whose weights were released by an "unload"; True when it reloaded."""
    if loaded.model is not None:
        return False
    fresh = load_hf_model(**loaded.load_args)
    for name in ("model", "budget_bytes", "reserve_gb", "dtype_report", "placement", "skip_plan", "critical_layers",
                 "telemetry", "notes", "streamer", "split", "fingerprint", "restored_generation_fields", "engine",
                 "moe", "tier_plan", "ram_budget_bytes"):
        setattr(loaded, name, getattr(fresh, name))
    return True


def _apply_quantization_kwargs(kwargs, config, method, mode, plan: SkipPlan, fp32_offload: bool) -> None:
    skip = plan.modules_to_not_convert
    if method:
        # Pre-quantized: the folder's own quantization_config wins in transformers; edit it in place.
        qc = dict(getattr(config, "quantization_config", {}) or {})
        if not isinstance(qc, dict):
            qc = qc.to_dict()
        qc["llm_int8_skip_modules"] = list(skip)
        qc["llm_int8_enable_fp32_cpu_offload"] = fp32_offload
        config.quantization_config = qc
    else:
        kwargs["quantization_config"] = bnb_config(mode, skip, fp32_offload)
    kwargs["config"] = config


def _drop_from_quantize(plan: SkipPlan, cpu_units: Sequence[str]) -> SkipPlan:
    """Layers inside CPU-mapped units stay float (bitsandbytes' fp32 CPU offload); reflect that in the plan."""
    keep = dict(plan.keep)
    quantize = []
    for name in plan.quantize:
        if any(name == u or name.startswith(u + ".") for u in cpu_units):
            keep[name] = "on CPU (fp32 offload)"
        else:
            quantize.append(name)
    return SkipPlan(keep=keep, quantize=quantize, modules_to_not_convert=sorted(set(plan.modules_to_not_convert) | set(cpu_units)))


def _plan_for_prequantized(folder: Path, skeleton, method: str, plan: SkipPlan):
    """Make the skip list agree with what is on disk and say what happens to the critical layers."""
    if method == "bitsandbytes_nf4":
        qc = (read_json_object(folder / CONFIG) or {}).get("quantization_config") or {}
        disk_skip = qc.get("llm_int8_skip_modules")
        if disk_skip is not None:
            names = [n for n, m in skeleton.named_modules() if type(m) is nn.Linear]
            from .bnb import transformers_keeps

            keep = {n: "stored unquantized" for n in names if transformers_keeps(n, disk_skip)}
            plan = SkipPlan(keep=keep, quantize=[n for n in names if n not in keep], modules_to_not_convert=list(disk_skip))
        return plan, f"NF4 on disk; {len(plan.keep)} critical layers stored in bf16, kept", []
    on_disk = int8_layers_on_disk(weight_files(folder))
    check_int8_shapes(on_disk, {n: m.weight.shape for n, m in skeleton.named_modules() if type(m) is nn.Linear})
    critical_int8 = sorted(n for n in plan.keep if n in on_disk)
    missing = sorted(n for n in plan.quantize if n not in on_disk)
    if missing:
        raise LoaderError(f"{folder}: {method} folder but {len(missing)} layers our skip list would quantize are not "
                          f"INT8 on disk (e.g. {missing[:3]}); re-save it with save_quantized or load the float original")
    if method == "bitsandbytes_int8_full" or critical_int8:
        if method != "bitsandbytes_int8_full":
            log.warning("%s says %s but %d critical layers are INT8 on disk; dequantizing them", folder, method,
                        len(critical_int8))
        note = (f"INT8-Full on disk: {len(critical_int8)} critical layers stored INT8, dequantized to bf16 on load")
        return plan, note, critical_int8
    note = f"INT8-Selective on disk: {len(plan.keep)} critical layers already bf16, kept as stored"
    return plan, note, []


def dequantize_critical_layers(model: nn.Module, folder: Path, names: Sequence[str],
                               dtypes: dict | None = None, dtype=torch.bfloat16) -> int:
    """Overwrite the float weights of ``names`` with ``int8 * SCB / 127`` read from the folder's files.

    transformers fills those (float) layers by casting the stored int8 values, which is wrong by the
    scale; this puts the real values back, in the dtype the model's code declares for the layer
    (``dtypes``: the float32 MoE router stays float32).
    """
    from safetensors import safe_open

    wanted = {f"{n}.weight": n for n in names}
    done = 0
    for file in weight_files(Path(folder)):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key, layer in wanted.items():
                if key in keys and f"{layer}.SCB" in keys:
                    module = model.get_submodule(layer)
                    target = module.weight
                    layer_dtype = (dtypes or {}).get(layer, dtype)
                    w = bnb_int8_dequantize(f.get_tensor(key), f.get_tensor(f"{layer}.SCB"), layer_dtype)
                    with torch.no_grad():
                        module.weight = nn.Parameter(w.to(target.device), requires_grad=False)
                    done += 1
    if done != len(names):
        raise LoaderError(f"{folder}: dequantized {done} of {len(names)} critical layers; the files lack some "
                          "weight/SCB pairs - the folder is incomplete")
    return done


def _from_pretrained_tracked(folder: Path, kwargs: dict):
    """``from_pretrained`` inside a MemoryTracker; bitsandbytes' map rejection becomes advice."""
    from transformers import AutoModelForCausalLM

    tracker = _tracker()
    try:
        with tracker:
            import warnings

            with warnings.catch_warnings(), cast_notice_once():
                warnings.filterwarnings("ignore", message=".*quantization_config.*")
                model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except ValueError as err:
        if "dispatched on the CPU" in str(err):
            raise MapRejected(str(err)) from None
        raise
    report = getattr(tracker, "report", None)
    telemetry = report.as_dict() if report is not None else {}
    model.eval()
    return model, telemetry


def _tracker():
    from ...memory.tracker import MemoryTracker

    return MemoryTracker()


def _check_report(model: nn.Module, plan: SkipPlan, report: DtypeReport) -> None:
    """After loading: every kept layer is float, every planned layer quantized - else the load is wrong."""
    modules = dict(model.named_modules())
    leaked = [n for n in plan.keep if n in modules and is_quantized_layer(modules[n])]
    unquantized = [n for n in plan.quantize if n in modules and not is_quantized_layer(modules[n])]
    if leaked or report.leaks:
        raise LoaderError(f"layers meant to stay full precision were quantized: {(leaked or report.leaks)[:5]} - "
                          "this gives noise images; report this with the dtype report above")
    if unquantized:
        log.warning("%d layers planned for quantization stayed float: %s", len(unquantized), unquantized[:5])


# ------------------------------------------------------------------------------ BF16 streaming


def _take_back_offloaded(model, folder, kwargs, telemetry, notes):
    """BF16 streaming: the CPU-mapped layers were loaded straight into RAM (the GPU part straight to the GPU:
    peak RAM = the streamed part), then accelerate attached its offload hooks; take the tensors back for
    our streaming. Should that fail, load everything into RAM instead (correct, more peak RAM)."""
    from .placement import undo_accelerate_offload

    try:
        undo_accelerate_offload(model)
        return model
    except Exception as err:  # noqa: BLE001 - logged, and the slower safe path follows
        log.warning("could not take the offloaded layers back from accelerate (%s); loading into RAM instead", err)
        notes.append("fallback: loaded into RAM first (accelerate offload could not be undone)")
        del model
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        kwargs = dict(kwargs, device_map={"": "cpu"})
        model, again = _from_pretrained_tracked(folder, kwargs)
        telemetry.update(again)
        return model


def _start_streaming(model: nn.Module, device: int, blocks_resident: int):
    """Hand the decoder layers to memory/'s block streaming (pinned, prefetched on a side stream)."""
    from ...memory.streaming import enable_block_streaming

    # The first N layers were loaded onto the GPU: keep exactly those resident ("first", not spread out).
    return enable_block_streaming(model, torch.device("cuda", device), blocks="model.layers",
                                  blocks_resident=blocks_resident, order="first")


# ------------------------------------------------------------------------------ saving


def save_quantized(loaded: LoadedModel, out_dir, overwrite: bool = False) -> Path:
    """Write the loaded INT8/NF4 model as a pre-quantized folder, so later loads skip quantization.

    ``quantization_method`` goes into config.json and the safetensors metadata: ``bitsandbytes_int8``
    when every critical layer is float (the usual case), ``bitsandbytes_int8_full`` when they are INT8
    too, ``bitsandbytes_nf4`` for NF4. Remote code, generation config and tokenizer files are copied.
    """
    if loaded.mode not in ("int8", "nf4"):
        raise LoaderError(f"save_quantized writes INT8/NF4 folders; this model is {loaded.mode}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoaderError(f"{out} is a file; save_quantized writes a folder - pick a new folder name")
    if out.exists() and out.resolve() == Path(loaded.path).resolve():
        raise LoaderError(f"{out} is the folder the model was loaded from; save_quantized never writes over its "
                          "input - pick a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoaderError(f"{out} exists and is not empty; pick a new folder or pass overwrite=True")
    if loaded.engine == HEADROOM_INT8:
        raise LoaderError("a model on headroom's INT8 engine is saved with the command line, from the float folder: "
                          f"`headroom convert {loaded.path} <new folder>` writes a folder this loader reads without "
                          "quantizing again")
    if loaded.placement_owner is not None:
        raise LoaderError("a streamed or split model cannot be saved; load it on one GPU without streaming first")
    model = loaded.model
    if loaded.mode == "nf4":
        method = "bitsandbytes_nf4"
    else:
        patterns = hunyuan3_skip_patterns()
        critical_quantized = [n for n, m in model.named_modules() if is_bnb_quantized(m) and matching_pattern(n, patterns)]
        method = "bitsandbytes_int8_full" if critical_quantized else "bitsandbytes_int8"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, metadata={"quantization_method": method}) \
        if _accepts_metadata(model) else model.save_pretrained(out, safe_serialization=True)
    config = read_json_object(out / CONFIG) or {}
    config["quantization_method"] = method
    (out / "config.json").write_text(json.dumps(config, indent=2))
    src = Path(loaded.path)
    import shutil

    for item in src.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")) and item.name not in (
                "config.json", "model.safetensors.index.json") and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    if (src / "generation_config.json").exists():  # the original keeps the custom fields
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    log.info("saved %s folder to %s", method, out)
    return out


def _accepts_metadata(model) -> bool:
    import inspect

    return "metadata" in inspect.signature(model.save_pretrained).parameters


def folder_fingerprint(folder) -> str:
    """Changes when the folder's files change (names, sizes, mtimes): the cache reloads then."""
    folder = Path(folder)
    parts = []
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{int(st.st_mtime_ns)}")
    return "|".join(parts)

