"""Budget loaders for transformers models with remote code (HunyuanImage-3): INT8 / NF4 / BF16.

One function, :func:`load_hf_model`, does what seed 000's loaders did, with the failure modes fixed:
- skip list resolved against the real module tree (``quant/bnb.py``), verified again after loading
  through the dtype report (no "colourful noise" from a VAE that slipped into INT8);
- ``device_map="auto"`` + ``max_memory`` from the budget with ``llm_int8_enable_fp32_cpu_offload=False``;
  when the quantized model does not fit the budget, an explicit map that keeps every quantized layer on
  the GPU (``memory/hf_placement.py``) instead of bitsandbytes' "Some modules are dispatched on the CPU";
- BF16: the part that does not fit is streamed by our block streaming (pinned, prefetched), not by
  accelerate's synchronous hooks;
- pre-quantized folders (``quantization_method``: ``bitsandbytes_int8_full`` / ``bitsandbytes_int8`` /
  ``bitsandbytes_nf4``) load without quantizing again; critical layers of a "full" folder are
  dequantized to bf16;
- the generation config's custom fields are restored (``generate_image`` reads them);
- Tencent's code under transformers 5.x is refused at load time with the pip command that works;
- load telemetry: wall time, peak process RSS, peak VRAM, dtype report, placement plan.

No ComfyUI import here: the nodes call this, and so can a script.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ...quant.formats import safetensors_files
from ...quant.report import DtypeReport, dtype_report
from ...quant.skip import matching_pattern
from ...units import GB
from .bnb import (
    SkipPlan,
    bnb_config,
    bnb_int8_dequantize,
    bnb_skip_modules,
    hunyuan3_skip_patterns,
    is_bnb_quantized,
    plan_skips,
    quantized_bytes_per_param,
)

log = logging.getLogger("comfyui_headroom")

MODES = ("int8", "nf4", "bf16")
QUANTIZATION_METHODS = {
    "bitsandbytes_int8_full": "int8",  # every Linear INT8 on disk; critical layers dequantized on load
    "bitsandbytes_int8": "int8",  # selective: critical layers stored in bf16 on disk
    "bitsandbytes_nf4": "nf4",
}
# The versions Tencent's code runs under (checked on an H100; see docs/hunyuan3.md).
TENCENT_PIP_COMMAND = 'pip install "transformers==4.57.1" "huggingface-hub==0.36.0" "diffusers>=0.35,<0.36"'

class LoaderError(ValueError):
    """A load that cannot work as asked; the message says what to change."""


class MapRejected(RuntimeError):
    """bitsandbytes refused a device map that puts quantized layers on the CPU."""


@dataclass
class LoadedModel:
    """A loaded model plus everything the generators and the status line need."""

    model: nn.Module
    path: str
    mode: str
    budget_bytes: int | None
    reserve_gb: float
    external_vram_gb: float
    dtype_report: DtypeReport
    placement: Any
    skip_plan: SkipPlan | None = None
    quantization_method: str | None = None  # what the folder said (pre-quantized), None for float folders
    critical_layers: str = ""  # what happened to the critical layers
    tencent_code: bool = False
    restored_generation_fields: list[str] = field(default_factory=list)
    telemetry: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    streamer: Any = None  # BF16: the block streamer, when part of the model is streamed
    fingerprint: str = ""
    parked: Any = None  # set while soft-unloaded: (how, device)
    on_unload: Any = None  # called by post_action "unload" (the node's cache drops the model)
    load_args: dict = field(default_factory=dict)  # how to load it again after an unload
    cache_key: Any = None  # the node cache's key (nodes/hunyuan3_nodes.py)

    def release(self) -> None:
        """Drop the weights (post_action "unload"); ComfyUI may still cache this object, so the next run
        reloads through :func:`ensure_loaded`."""
        if self.streamer is not None:
            try:
                self.streamer.disable()
            except Exception:  # the weights go anyway
                pass
            self.streamer = None
        self.model = None
        self.parked = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def summary(self) -> str:
        lines = [f"{self.mode.upper()} model from {self.path}"]
        if self.quantization_method:
            lines.append(f"pre-quantized ({self.quantization_method}): {self.critical_layers}")
        elif self.critical_layers:
            lines.append(self.critical_layers)
        lines.append(str(self.dtype_report))
        lines.append(str(self.placement))
        t = self.telemetry
        if t:
            vram = f", peak VRAM {t['peak_vram_bytes'] / GB:.2f} GB" if t.get("peak_vram_bytes") else ""
            lines.append(f"load: {t.get('wall_s', 0):.1f}s, peak RAM {t.get('peak_rss_bytes', 0) / GB:.2f} GB{vram}")
        lines.extend(self.notes)
        return "\n".join(lines)


# ------------------------------------------------------------------------------ folder inspection


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise LoaderError(f"{path}: not valid JSON ({err}); re-download or fix the file") from err


def check_model_folder(path, trust_remote_code: bool) -> dict:
    """The folder's config.json; refuses remote code without consent and anything but a local folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoaderError(f"{path}: not a local folder. Download the model first (e.g. `hf download ... "
                          "--local-dir <ComfyUI>/models/hunyuan3/<name>`) and pick that folder")
    config = read_json(folder / "config.json")
    if not config:
        raise LoaderError(f"{folder}: no config.json - not a transformers model folder")
    if config.get("auto_map") and not trust_remote_code:
        module = next(iter(config["auto_map"].values()))
        raise LoaderError(f"{folder} ships its own Python code ({module}); loading it runs that code. Turn on "
                          "trust_remote_code only for folders from a source you trust")
    return config


def safetensors_metadata(folder: Path) -> dict:
    from safetensors import safe_open

    files = safetensors_files(folder)
    if not files:
        return {}
    with safe_open(str(files[0]), framework="pt") as f:
        return dict(f.metadata() or {})


def detect_quantization_method(folder, config: dict | None = None) -> str | None:
    """``quantization_method`` from config.json (top level or inside ``quantization_config``) or the
    safetensors metadata; for a bitsandbytes folder without it, INT8 vs NF4 from ``quantization_config``."""
    folder = Path(folder)
    config = config if config is not None else read_json(folder / "config.json")
    qc = config.get("quantization_config") or {}
    method = config.get("quantization_method") or qc.get("quantization_method")
    if not method:
        method = safetensors_metadata(folder).get("quantization_method")
    if not method and qc.get("quant_method") == "bitsandbytes":
        method = "bitsandbytes_nf4" if qc.get("load_in_4bit") else "bitsandbytes_int8"
    if method and method not in QUANTIZATION_METHODS:
        raise LoaderError(f"{folder}: unknown quantization_method {method!r}; known: {sorted(QUANTIZATION_METHODS)}")
    return method


def int8_layers_on_disk(folder: Path) -> set[str]:
    """Layers whose ``weight`` is stored as int8 next to an LLM.int8 ``SCB`` scale."""
    from safetensors import safe_open

    found: set[str] = set()
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".SCB") and key[:-4] + ".weight" in keys:
                    found.add(key[:-4])
    return found


# ------------------------------------------------------------------------------ remote code


def build_skeleton(folder, config_obj, trust_remote_code: bool, attn_implementation: str | None):
    """The model on the meta device: module names, shapes and the remote module, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights():
        try:
            return AutoModelForCausalLM.from_config(config_obj, dtype=torch.bfloat16, **kwargs)
        except (ValueError, TypeError) as err:
            if attn_implementation and "attn" in str(err).lower():
                raise LoaderError(f"{folder}: attention implementation {attn_implementation!r} is not supported "
                                  f"by this model ({err}); pick 'sdpa' or 'eager'") from err
            raise


def is_tencent_code(model: nn.Module) -> bool:
    """Tencent's HunyuanImage-3 modeling code defines ``HunyuanStaticCache`` in the model's module."""
    import sys

    module = sys.modules.get(type(model).__module__)
    return module is not None and hasattr(module, "HunyuanStaticCache")


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def check_transformers_version(skeleton: nn.Module, folder) -> None:
    """Tencent's code breaks inside ``generate_image`` under transformers 5.x (its ``HunyuanStaticCache``
    predates the v5 cache API) and without CUDA: refuse now, with the command that gives a working
    environment, instead of a traceback in the middle of a generation."""
    if not is_tencent_code(skeleton):
        return
    if not torch.cuda.is_available():
        raise LoaderError(f"{folder}: Tencent's HunyuanImage-3 code runs on CUDA only (CUDA autocast, "
                          "torch.cuda.set_device in its MoE); this machine has no CUDA device")
    if transformers_major() >= 5:
        import transformers

        raise LoaderError(
            f"{folder}: Tencent's HunyuanImage-3 code does not run under transformers {transformers.__version__} "
            "(its HunyuanStaticCache does not fit the v5 cache API: generation would fail midway). Install the "
            f"versions it was written for, in ComfyUI's Python: {TENCENT_PIP_COMMAND}")


def restore_generation_config(model: nn.Module, folder) -> list[str]:
    """Copy generation_config.json's custom fields (``use_system_prompt``, ``bot_task``, ``diff_infer_steps``
    ...) onto ``model.generation_config`` where transformers dropped them; returns the restored names."""
    data = read_json(Path(folder) / "generation_config.json")
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


def load_hf_model(path, mode: str = "int8", budget_gb: float = 0.0, external_vram_gb: float = 0.0,
                  trust_remote_code: bool = False, attn_implementation: str | None = "sdpa",
                  device_map: str | dict = "auto", gpu_layers: int | None = None,
                  skip: Sequence[str] | str | None = None, keep_attention: bool = True, device: int = 0,
                  reserve_gb: float | None = None, skip_patterns: Sequence[str] | None = None,
                  gpu_budgets_gb: str = "") -> LoadedModel:
    """Load a transformers model folder under a VRAM budget.

    ``mode``: ``int8`` / ``nf4`` (bitsandbytes) or ``bf16``; a pre-quantized folder decides it itself.
    ``budget_gb``: VRAM for weights (0 = 55 % of the card). ``device_map``: "auto" (from the budget),
    "manual" (critical modules + the first ``gpu_layers`` decoder layers on the GPU) or an explicit dict,
    which is validated before loading. ``skip``: extra skip patterns on top of the HunyuanImage-3 defaults;
    ``skip_patterns`` replaces the whole list (``[]`` quantizes every Linear: how INT8-Full folders are made).
    ``gpu_budgets_gb``: several GPUs, one budget each (``"40,40"``; one number = that on every GPU) - the
    INT8/NF4 model is spread over them by accelerate's ``device_map="auto"`` with one ``max_memory`` entry per
    GPU (issue #9); it replaces ``budget_gb``. Checked before anything is loaded.
    """
    if mode not in MODES:
        raise LoaderError(f"mode must be one of {MODES}, got {mode!r}")
    folder = Path(path)
    raw_config = check_model_folder(folder, trust_remote_code)
    method = detect_quantization_method(folder, raw_config)
    if method:
        disk_mode = QUANTIZATION_METHODS[method]
        if mode != disk_mode:
            log.info("%s is pre-quantized (%s): loading as %s, not %s", folder, method, disk_mode, mode)
        mode = disk_mode

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    skeleton = build_skeleton(folder, config, trust_remote_code, attn_implementation)
    check_transformers_version(skeleton, folder)
    tencent = is_tencent_code(skeleton)

    patterns = list(skip_patterns) if skip_patterns is not None else hunyuan3_skip_patterns(skip, keep_attention)
    plan = bnb_skip_modules(skeleton, patterns) if mode != "bf16" else plan_skips([], patterns)
    critical_note = ""
    full_critical: list[str] = []
    if method:
        plan, critical_note, full_critical = _plan_for_prequantized(folder, skeleton, method, patterns, plan)

    multi_gpu_memory = _multi_gpu_max_memory(gpu_budgets_gb, mode, device_map, external_vram_gb)
    info = cuda_device_info(device)
    budget_bytes = None
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    notes: list[str] = []
    fp32_offload = False
    stream_plan: dict | None = None

    split_budgets = None  # BF16 over several GPUs: {gpu index: bytes} for our split after loading
    if multi_gpu_memory is not None and mode == "bf16":
        # Our placement, not accelerate's hooks: load into RAM, then split the decoder layers over the GPUs
        # (memory/multi_device.py); layers that fit on no GPU stream from pinned RAM onto the last one.
        kwargs["device_map"] = {"": "cpu"}
        split_budgets = {k: v for k, v in multi_gpu_memory.items() if k != "cpu"}
        budget_bytes = sum(split_budgets.values())
        notes.append("BF16 loaded into RAM, then split over " + ", ".join(
            f"cuda:{k} <= {v / GB:.1f} GB" for k, v in split_budgets.items()) + " by headroom")
    elif multi_gpu_memory is not None:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = multi_gpu_memory
        budget_bytes = sum(v for k, v in multi_gpu_memory.items() if k != "cpu")
        notes.append("spread over " + ", ".join(f"cuda:{k} <= {v / GB:.1f} GB" for k, v in multi_gpu_memory.items()
                                                 if k != "cpu") + " by accelerate's device_map='auto'")
    elif info is None:
        # No CUDA (CI, CPU-only machines): everything on the CPU; bitsandbytes uses its CPU backend.
        kwargs["device_map"] = {"": "cpu"}
        notes.append("no CUDA device: loaded on the CPU")
    else:
        from .placement import (
            manual_device_map,
            max_memory_for_budget,
            plan_quantized_map,
            resolve_budget,
            validate_device_map,
        )

        _free, total = info
        budget_bytes = resolve_budget(budget_gb, total) - int(external_vram_gb * GB)
        if budget_bytes <= 0:
            raise LoaderError(f"GPU budget {budget_gb} GB minus external VRAM {external_vram_gb} GB leaves nothing "
                              "for weights; raise the budget or lower external_vram_gb")
        quantized = set(plan.quantize)
        bpp = quantized_bytes_per_param(mode) if mode != "bf16" else 2.0
        if isinstance(device_map, dict):
            validate_device_map(device_map, skeleton)
            chosen = dict(device_map)
        elif device_map == "manual":
            if gpu_layers is None:
                raise LoaderError("device_map='manual' needs gpu_layers (how many decoder layers stay on the GPU)")
            chosen = manual_device_map(skeleton, gpu_layers, device)
        elif device_map == "auto":
            qplan = plan_quantized_map(skeleton, budget_bytes, lambda n: n in quantized, bpp, device)
            notes.extend(qplan.notes)
            chosen = "auto" if not qplan.needs_fp32_cpu_offload else qplan.device_map
        else:
            raise LoaderError(f"device_map must be 'auto', 'manual' or a dict, got {device_map!r}")

        if mode == "bf16":
            # Our streaming, not accelerate's hooks: everything that is not a decoder layer and as many layers
            # as the budget holds load straight to the GPU, the rest straight into RAM, streamed from pinned
            # memory afterwards (memory/streaming.py). A manual map decides the resident layers itself.
            model_bytes = sum(t.numel() * t.element_size() for t in skeleton.parameters())
            if device_map == "auto" and model_bytes <= budget_bytes:
                kwargs["device_map"] = {"": device}  # fits: straight to the GPU, no streaming
            else:
                from .placement import bf16_stream_map

                fixed = None
                if isinstance(chosen, dict):
                    fixed = sum(1 for u, d in chosen.items() if u.startswith("model.layers.") and d != "cpu")
                load_map, resident = bf16_stream_map(skeleton, budget_bytes, device, gpu_layers=fixed)
                kwargs["device_map"] = load_map
                if any(d == "cpu" for d in load_map.values()):
                    stream_plan = {"budget_bytes": budget_bytes, "device": device, "blocks_resident": resident}
                    notes.append(f"BF16 model {model_bytes / GB:.2f} GB, budget {budget_bytes / GB:.2f} GB: "
                                 f"{resident} decoder layers on the GPU, the others stream from pinned RAM")
        elif chosen == "auto":
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = max_memory_for_budget(budget_bytes / GB, device, total)
        else:
            cpu_quantized = [u for u, d in chosen.items() if d == "cpu" and any(q == u or q.startswith(u + ".") for q in quantized)]
            if cpu_quantized:
                notes.append(f"{len(cpu_quantized)} modules with quantizable layers are mapped to the CPU; they stay "
                             f"in bf16 there (bitsandbytes keeps CPU-offloaded layers unquantized): "
                             f"{', '.join(cpu_quantized[:4])}{' ...' if len(cpu_quantized) > 4 else ''}")
                plan = _drop_from_quantize(plan, cpu_quantized)
            fp32_offload = any(d == "cpu" for d in chosen.values())
            kwargs["device_map"] = chosen

    if mode != "bf16":
        _apply_quantization_kwargs(kwargs, config, method, mode, plan, fp32_offload)
    else:
        kwargs["config"] = config

    try:
        model, telemetry = _from_pretrained_tracked(folder, kwargs, mode, plan)
        if stream_plan is not None:
            model = _take_back_offloaded(model, folder, kwargs, mode, plan, telemetry, notes)
    except MapRejected:
        if multi_gpu_memory is not None:
            raise LoaderError(f"{folder}: the {mode.upper()} model does not fit gpu_budgets_gb={gpu_budgets_gb!r} "
                              "(bitsandbytes refuses quantized layers on the CPU): raise the budgets or use NF4") \
                from None
        if kwargs.get("device_map") != "auto":
            raise LoaderError(f"{folder}: bitsandbytes rejected the device map (quantized layers on the CPU). "
                              "Raise the budget, use NF4, or set device_map='manual' with fewer gpu_layers") from None
        # transformers sized the model differently from our plan (it keeps 10 % aside): our plan said it
        # fits, so place everything on the GPU explicitly.
        notes.append("transformers' auto map spilled to the CPU; loaded with the planned all-GPU map instead")
        kwargs.pop("max_memory", None)
        kwargs["device_map"] = {"": device}
        model, telemetry = _from_pretrained_tracked(folder, kwargs, mode, plan)
    if full_critical:
        dtypes = {n: skeleton.get_submodule(n).weight.dtype for n in full_critical}
        dequantized = dequantize_critical_layers(model, folder, full_critical, dtypes)
        critical_note += f": {dequantized} layers dequantized INT8 -> bf16"
    log.info("%s", critical_note or "no pre-quantized layers")

    restored = restore_generation_config(model, folder)
    if hasattr(model, "load_tokenizer") and any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        model.load_tokenizer(str(folder))  # Tencent's code: the tokenizer travels with the model
    streamer = None
    if stream_plan is not None:
        streamer = _start_streaming(model, **stream_plan)
        notes.append(f"BF16 streaming: {streamer.summary()}")
    if split_budgets is not None:
        from ...memory import enable_multi_device
        from ...memory.budgets import plan_for_gpus
        from .placement import LAYERS_PREFIX

        # Kept as the model's placement owner, like a streamer: soft unload leaves it alone, save refuses it.
        streamer = enable_multi_device(model, plan_for_gpus(model, split_budgets, blocks=LAYERS_PREFIX),
                                       blocks=LAYERS_PREFIX)
        notes.append(f"BF16 {streamer.summary()}")
    report = dtype_report(model, patterns, plan.keep)
    _check_report(model, plan, report)

    from .placement import describe_placement

    placement = describe_placement(model)
    if streamer is not None:
        placement.offloaded_by = "headroom-multi-device" if split_budgets is not None else "headroom-streaming"
    log.info("%s", placement)
    if reserve_gb is None:
        # seed 000's loader reserve: VRAM promised to others, added to the inference estimate in smart mode
        reserve_gb = float(external_vram_gb)
    load_args = dict(path=str(folder), mode=mode, budget_gb=budget_gb, external_vram_gb=external_vram_gb,
                     trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                     device_map=device_map, gpu_layers=gpu_layers, skip=skip, keep_attention=keep_attention,
                     device=device, skip_patterns=skip_patterns, gpu_budgets_gb=gpu_budgets_gb)
    loaded = LoadedModel(model=model, path=str(folder), mode=mode, load_args=load_args, budget_bytes=budget_bytes,
                         reserve_gb=reserve_gb, external_vram_gb=external_vram_gb, dtype_report=report, placement=placement, skip_plan=plan,
                         quantization_method=method, critical_layers=critical_note, tencent_code=tencent,
                         restored_generation_fields=restored, telemetry=telemetry, notes=notes, streamer=streamer,
                         fingerprint=folder_fingerprint(folder))
    # What the generators read (seed 000 kept the reserve on the model as ``_loader_reserve_gb``).
    model._loader_reserve_gb = reserve_gb
    model._headroom_budget_bytes = budget_bytes
    log.info("%s", loaded.summary())
    return loaded


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


def ensure_loaded(loaded: LoadedModel) -> bool:
    """Reload a model whose weights were released by an "unload"; True when it reloaded."""
    if loaded.model is not None:
        return False
    fresh = load_hf_model(**loaded.load_args)
    for name in ("model", "budget_bytes", "reserve_gb", "dtype_report", "placement", "skip_plan", "critical_layers",
                 "telemetry", "notes", "streamer", "fingerprint", "restored_generation_fields"):
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


def _plan_for_prequantized(folder: Path, skeleton, method: str, patterns, plan: SkipPlan):
    """Make the skip list agree with what is on disk and say what happens to the critical layers."""
    if method == "bitsandbytes_nf4":
        qc = read_json(folder / "config.json").get("quantization_config") or {}
        disk_skip = qc.get("llm_int8_skip_modules")
        if disk_skip is not None:
            names = [n for n, m in skeleton.named_modules() if type(m) is nn.Linear]
            from .bnb import transformers_keeps

            keep = {n: "stored unquantized" for n in names if transformers_keeps(n, disk_skip)}
            plan = SkipPlan(keep=keep, quantize=[n for n in names if n not in keep], modules_to_not_convert=list(disk_skip))
        return plan, f"NF4 on disk; {len(plan.keep)} critical layers stored in bf16, kept", []
    on_disk = int8_layers_on_disk(folder)
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
    for file in safetensors_files(Path(folder)):
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


def _from_pretrained_tracked(folder: Path, kwargs: dict, mode: str, plan: SkipPlan):
    """``from_pretrained`` inside a MemoryTracker; bitsandbytes' map rejection becomes advice."""
    from transformers import AutoModelForCausalLM

    tracker = _tracker()
    try:
        with tracker:
            import warnings

            with warnings.catch_warnings():
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
    leaked = [n for n in plan.keep if n in modules and is_bnb_quantized(modules[n])]
    unquantized = [n for n in plan.quantize if n in modules and not is_bnb_quantized(modules[n])]
    if leaked or report.leaks:
        raise LoaderError(f"layers meant to stay full precision were quantized: {(leaked or report.leaks)[:5]} - "
                          "this gives noise images; report this with the dtype report above")
    if unquantized:
        log.warning("%d layers planned for quantization stayed float: %s", len(unquantized), unquantized[:5])


# ------------------------------------------------------------------------------ BF16 streaming


def _take_back_offloaded(model, folder, kwargs, mode, plan, telemetry, notes):
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
        model, again = _from_pretrained_tracked(folder, kwargs, mode, plan)
        telemetry.update(again)
        return model


def _start_streaming(model: nn.Module, budget_bytes: int, device: int, blocks_resident: int | None = None):
    """Hand the decoder layers to memory/'s block streaming (pinned, prefetched on a side stream)."""
    from ...memory.streaming import enable_block_streaming

    # The first N layers were loaded onto the GPU: keep exactly those resident ("first", not spread out).
    kwargs = ({"blocks_resident": blocks_resident, "order": "first"} if blocks_resident is not None
              else {"budget_bytes": budget_bytes})
    return enable_block_streaming(model, torch.device("cuda", device), blocks="model.layers", **kwargs)


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
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoaderError(f"{out} exists and is not empty; pick a new folder or pass overwrite=True")
    if loaded.streamer is not None:
        raise LoaderError("a streamed model cannot be saved; load it without streaming first")
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
    config = read_json(out / "config.json")
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


def env_summary() -> dict:
    import transformers

    info = {"transformers": transformers.__version__, "torch": torch.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    info["cuda"] = torch.cuda.is_available()
    info["pid"] = os.getpid()
    info["time"] = time.time()
    return info
