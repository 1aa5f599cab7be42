"""INT8 layers as ComfyUI ``comfy.ops`` citizens, loaded through ComfyUI's own hook.

``comfy.sd.load_diffusion_model(path, model_options={"custom_operations": ops})`` builds ComfyUI's model
with *our* layer classes (as ComfyUI-GGUF does). :func:`make_int8_ops` returns such an ``ops`` class:

* ``Linear`` decides per layer, while the state dict is loaded, what it becomes:
  - the file already holds an INT8 weight (ours, ComfyUI ``int8_tensorwise`` incl. per-channel scales and
    the Hadamard-rotated ``convrot`` variant, lightx2v/OneTrainer: any registered format): kept as is, read by
    :func:`...quant.formats.parse_int8_layer`; a rotated weight keeps the ``rotation_group`` its format read,
    so the input is rotated to match (never computed as if plain);
  - a float / fp8 weight that no skip rule protects, with ``quantize_on_load``: quantized right there, one
    layer at a time and a few rows at a time (:func:`...quant.chunked.quantize_streamed`, the converter's own),
    and the source pages of the memory-mapped file are handed back
    (:mod:`.page_release`) - no second full copy in RAM (seed 003); with ``rotation_group`` the weight is
    Hadamard-rotated first (QuaRot, :mod:`.rotation`) and its input is rotated to match at run time;
  - otherwise it stays a float layer that behaves exactly like ComfyUI's ``manual_cast.Linear``.
* ``Embedding`` dequantizes an INT8 table if a file has one: embeddings stay float.
* every other layer (norms, convs) is ComfyUI's own ``manual_cast`` class.

An INT8 layer takes part in ComfyUI's memory management: when ComfyUI's partial loading leaves its weight
on the CPU, the forward copies it over with ComfyUI's ``cast_bias_weight`` (offload streams, pinned
memory) - int8 bytes, never a float copy. LoRA on it runs as float side branches that
``Int8ModelPatcher`` (:mod:`.comfy_patcher`) builds from the patcher's patches (see :mod:`.lora`).

Nothing here imports ComfyUI at module level: the classes are built on first use (:func:`_base_classes`); what a
layer does while loading is plain functions of the layer (:func:`_load_linear` and its helpers).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...kernels.dispatch import COMPUTE_CHOICES, force_kernel
from ...kernels.int8 import DEFAULT_BLOCK_SIZE, FP8_DTYPES, METHODS
from ...kernels.rotation import dequantize_unrotated, rotation_fits
from ...quant.chunked import WeightError, float_rows, quantize_streamed
from ...quant.formats import (
    Int8LayerTensors,
    find_scale_key,
    layer_comfy_format,
    parse_int8_layer,
    quantization_keys,
)
from ...quant.linear import Int8Linear
from ...quant.page_release import release_file_pages
from ...quant.skip import DEFAULT_MIN_FEATURES, decide, resolve_patterns
from ...units import GB

log = logging.getLogger("comfyui_headroom")

# Layers ComfyUI's native models keep in full precision: input/output projections, timestep/text
# embedders, modulation and final layers (Flux/Flux 2, Wan, Qwen-Image, Z-Image, HunyuanImage, Kandinsky).
NATIVE_SKIP_PATTERNS: tuple[str, ...] = (
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer", "norm_out", "proj_out",
    "img_mod", "txt_mod", "modulation", "adaLN", "distilled_guidance_layer",
    "patch_embedding", "text_embedding", "time_embedding", "time_projection", "head.head", "img_emb",
    "time_text_embed", "x_embedder", "t_embedder", "cap_embedder",
)
# The per-block modulation (scale/shift/gate) projections among those: large in some models (Qwen-Image keeps
# ~13 GB of them in bf16), so the loader lets a user quantize them too (``native_skip_patterns``).
MODULATION_PATTERNS: tuple[str, ...] = ("img_mod", "txt_mod", "modulation", "adaLN")


def native_skip_patterns(quantize_modulation: bool = False) -> tuple[str, ...]:
    """The default float layers of native models; without the modulation ones when those are quantized too."""
    if not quantize_modulation:
        return NATIVE_SKIP_PATTERNS
    return tuple(p for p in NATIVE_SKIP_PATTERNS if p not in MODULATION_PATTERNS)


# Text encoders: keep embeddings, projections, vision towers and heads in float.
TEXT_ENCODER_SKIP_PATTERNS: tuple[str, ...] = (
    "embed_tokens", "shared", "text_projection", "lm_head", "visual", "vision_model", "position_embedding",
)

WEIGHT_FORMATS = ("auto", "rowwise", "block", "tensorwise")


class Int8LoadError(ValueError):
    """A layer of the file cannot be loaded into an INT8 model (the message names it and says what to do)."""


@dataclass
class Int8LoadConfig:
    """How one load turns a checkpoint into INT8 layers."""

    weight_format: str = "auto"  # quantize_on_load granularity; "auto" = rowwise
    quantize_on_load: bool = True
    skip_patterns: Sequence[str] = ()  # extra patterns on top of the defaults below
    default_skips: Sequence[str] = NATIVE_SKIP_PATTERNS
    min_features: int = DEFAULT_MIN_FEATURES
    block_size: int = DEFAULT_BLOCK_SIZE
    file_metadata: dict | None = None
    quantize_device: str | None = None  # None: CUDA when available (fast), else CPU
    float_dtype: torch.dtype | None = None  # dtype of the layers kept in float; None: ComfyUI decides
    rotation_group: int = 0  # > 0: quantize-on-load stores Q(W H) (Hadamard, QuaRot) where the group fits
    compute: str = "auto"  # this model's kernel (kernels.dispatch.COMPUTE_CHOICES); "auto": the dispatcher decides
    fuse_blocks: str = "auto"  # fused block forwards (fused.FUSE_CHOICES); "auto" defers to HEADROOM_FUSE_BLOCKS
    disk_blocks: Sequence[str] = ()  # blocks the disk tier reads from the file: their linear layers keep no data

    def __post_init__(self) -> None:
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}; got {self.weight_format!r}")
        if self.compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}; got {self.compute!r}")
        from .fused import fuse_mode

        fuse_mode(self.fuse_blocks)  # a bad value (or HEADROOM_FUSE_BLOCKS) is named before anything loads
        if self.rotation_group:
            from ...kernels.rotation import check_group

            check_group(int(self.rotation_group))

    @property
    def method(self) -> str:
        return "rowwise" if self.weight_format == "auto" else self.weight_format

    @functools.cached_property
    def patterns(self) -> list[str]:
        patterns = resolve_patterns(list(self.default_skips) + list(self.skip_patterns), keep_default_skips=True)
        return patterns

    def device_for_quantization(self) -> torch.device:
        if self.quantize_device:
            return torch.device(self.quantize_device)
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class LoadLog:
    """What a load did, layer by layer (filled by the layers themselves)."""

    quantized_on_load: list[str] = field(default_factory=list)
    rotated_on_load: list[str] = field(default_factory=list)  # subset of quantized_on_load stored as Q(W H)
    from_file: dict[str, str] = field(default_factory=dict)  # layer -> source format (+ "+convrot")
    kept_float: dict[str, str] = field(default_factory=dict)  # layer -> reason
    missing: list[str] = field(default_factory=list)
    released_bytes: int = 0
    int8_bytes: int = 0
    float_linear_bytes: int = 0
    linear_layers: int = 0
    loaded_layers: int = 0
    seconds: float = 0.0
    fused_blocks: int = 0  # blocks given a fused forward (fused.install_fused_blocks)
    disk_file: str | None = None  # the INT8 file the disk tier streams blocks from (ram_budget_gb > 0)
    disk_cache_written: bool = False  # that file was converted into the INT8 cache by this load
    progress: Callable[[int, int], None] | None = None

    @property
    def int8_layers(self) -> int:
        return len(self.quantized_on_load) + len(self.from_file)

    def step(self) -> None:
        self.loaded_layers += 1
        if self.progress is not None:
            self.progress(self.loaded_layers, max(self.linear_layers, self.loaded_layers))

    def summary(self) -> str:
        parts = [f"{self.int8_layers} INT8 linear layers ({self.int8_bytes / GB:.2f} GB)"]
        if self.from_file:
            formats = sorted(set(self.from_file.values()))
            parts.append(f"{len(self.from_file)} read as INT8 ({', '.join(formats)})")
        if self.quantized_on_load:
            rotated = f", {len(self.rotated_on_load)} of them Hadamard-rotated" if self.rotated_on_load else ""
            parts.append(f"{len(self.quantized_on_load)} quantized while loading{rotated}")
        parts.append(f"{len(self.kept_float)} kept float ({self.float_linear_bytes / GB:.2f} GB)")
        if self.missing:
            parts.append(f"{len(self.missing)} missing in file")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# What one Linear becomes while its state dict loads (functions of the layer: no ComfyUI import needed)
# ---------------------------------------------------------------------------------------------------

def _module_name(config_prefix: str, prefix: str) -> str:
    return config_prefix + (prefix[:-1] if prefix.endswith(".") else prefix)


def _init_unloaded(layer, in_features: int, out_features: int, bias: bool, dtype) -> None:
    """A layer without tensors yet: the state dict decides what it becomes (:func:`_load_linear`)."""
    nn.Module.__init__(layer)
    layer.in_features = in_features
    layer.out_features = out_features
    layer.block_size = layer._config.block_size
    layer.rotation_group = 0
    layer.lora = []
    layer.float_dtype = dtype if dtype is not None else torch.float32
    layer.expects_bias = bool(bias)
    layer.register_parameter("weight", None)
    layer.register_parameter("bias", None)
    layer.register_buffer("weight_scale", None)
    layer.weight_function = []
    layer.bias_function = []
    layer._headroom_patches = None
    layer._log.linear_layers += 1


def _load_linear(layer, state_dict: dict, prefix: str, missing_keys: list) -> None:
    """The file's INT8 layer kept as it is, or a float / fp8 weight quantized right here or kept float."""
    record = layer._log
    name = _module_name(layer._name_prefix, prefix)
    stored = _take_int8_layer(state_dict, prefix, name, layer._config.file_metadata)
    bias = state_dict.pop(prefix + "bias", None)
    if stored is not None:
        _hold_int8(layer, stored.weight, stored.scale, stored.block_size, stored.rotation_group)
        record.from_file[name] = stored.source_format + ("+convrot" if stored.rotation_group else "")
    else:
        weight, fp8_scale = _take_float_weight(state_dict, prefix, name)
        if weight is None:
            record.missing.append(name)
            missing_keys.append(prefix + "weight")
            weight = torch.zeros(layer.out_features, layer.in_features, dtype=layer.float_dtype)
        _quantize_or_keep_float(layer, weight, fp8_scale, name)
    _load_bias(layer, bias, prefix, missing_keys)
    if any(name.startswith(block + ".") for block in layer._config.disk_blocks):
        _leave_on_disk(layer)
    record.step()


def _leave_on_disk(layer) -> None:
    """Let go of the layer's tensors (meta from here on): its block is planned on disk and read from the file on every
    pass, so the load never holds it in RAM (the disk tier, integrations/comfyui/disk_tier.py)."""
    for name in ("weight", "weight_scale", "bias"):
        tensor = getattr(layer, name, None)
        if tensor is None:
            continue
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if name in layer._parameters:
            layer._parameters[name] = nn.Parameter(meta, requires_grad=False)
        else:
            layer._buffers[name] = meta


def _take_int8_layer(state_dict: dict, prefix: str, name: str, file_metadata) -> Int8LayerTensors | None:
    """The INT8 layer the file holds at ``prefix`` in any registered format, its keys taken out of the state dict;
    None when the weight there is not int8. Int8LoadError naming the layer when it cannot be used as it is (e.g. a
    rotation headroom cannot undo: never computed as if plain)."""
    try:
        stored = parse_int8_layer(state_dict, prefix, file_metadata)
    except ValueError as err:
        raise Int8LoadError(f"layer '{name}': {err}") from None
    if stored is not None:
        for key in stored.consumed_keys:
            state_dict.pop(key, None)
    return stored


def _take_float_weight(state_dict: dict, prefix: str, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, fp8 scale)`` of a layer that is not INT8 in the file, the keys that described its quantization
    taken out; Int8LoadError for a ComfyUI format (nvfp4, ...) headroom cannot convert."""
    fmt = layer_comfy_format(state_dict, prefix)
    if fmt not in (None, "float8_e4m3fn", "float8_e5m2"):
        raise Int8LoadError(f"layer '{name}' is stored as ComfyUI '{fmt}', which headroom cannot "
                            f"convert to INT8; load this file with ComfyUI's UNETLoader instead")
    weight = state_dict.pop(prefix + "weight", None)
    scale_key = find_scale_key(state_dict, prefix)
    fp8_scale = state_dict[scale_key] if scale_key and weight is not None and weight.dtype in FP8_DTYPES else None
    for key in quantization_keys(state_dict, prefix):
        state_dict.pop(key)
    return weight, fp8_scale


def _quantize_or_keep_float(layer, weight: torch.Tensor, fp8_scale: torch.Tensor | None, name: str) -> None:
    """Quantize ``weight`` here, a few rows at a time (rotated where the config asks and the width fits), unless
    the config or a skip rule keeps it float; the file's pages are handed back either way (seed 003)."""
    cfg, record = layer._config, layer._log
    if not weight.is_floating_point():
        raise Int8LoadError(f"layer '{name}': weight has dtype {weight.dtype}; expected float, fp8 or int8")
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise Int8LoadError(f"layer '{name}': weight {tuple(weight.shape)} does not fit "
                            f"[{layer.out_features}, {layer.in_features}]")
    decision = None
    if cfg.quantize_on_load:
        decision = decide(name, layer.in_features, layer.out_features, cfg.patterns, cfg.method, cfg.block_size,
                          cfg.min_features)
    try:
        if decision is not None and not decision.skip:
            group = cfg.rotation_group if rotation_fits(layer.in_features, cfg.rotation_group) else 0
            q, scale, _ = quantize_streamed(weight, cfg.method, cfg.block_size, f"{name}.weight", fp8_scale,
                                            cfg.device_for_quantization(), rotation=group, measure_error=False)
            _hold_int8(layer, q, scale, cfg.block_size, group, copy=False)
            record.quantized_on_load.append(name)
            if group:
                record.rotated_on_load.append(name)
        else:
            plain = float_rows(weight, scale=fp8_scale, name=f"{name}.weight") if weight.dtype in FP8_DTYPES else weight
            layer.weight = nn.Parameter(plain.to(layer.float_dtype, copy=True), requires_grad=False)
            record.kept_float[name] = decision.reason if decision is not None else "quantize_on_load off"
            record.float_linear_bytes += layer.weight.numel() * layer.weight.element_size()
    except WeightError as err:  # NaN/inf, or an fp8 scale that does not fit: the message names the tensor
        raise Int8LoadError(str(err)) from None
    record.released_bytes += release_file_pages(weight)


def _hold_int8(layer, weight: torch.Tensor, scale: torch.Tensor, block_size: int, group: int, copy: bool = True):
    """Make ``layer`` an INT8 layer holding ``weight`` (its file pages handed back once copied)."""
    data = weight.detach().to("cpu")
    layer.weight = nn.Parameter(data.clone() if copy else data, requires_grad=False)
    release_file_pages(weight)
    layer.weight_scale = scale.detach().to("cpu", torch.float32).clone()
    layer.block_size = int(block_size)
    if group:
        layer._set_rotation(group)
    layer.weight_comfy_model_dtype = torch.int8
    layer.weight_scale_comfy_model_dtype = torch.float32
    layer._log.int8_bytes += layer.weight.numel() + layer.weight_scale.numel() * 4


def _load_bias(layer, bias: torch.Tensor | None, prefix: str, missing_keys: list) -> None:
    if bias is None:
        if not layer.expects_bias:
            return
        missing_keys.append(prefix + "bias")
        bias = torch.zeros(layer.out_features)
    dtype = layer.float_dtype if layer.float_dtype.is_floating_point and \
        layer.float_dtype not in FP8_DTYPES else torch.bfloat16
    layer.bias = nn.Parameter(bias.to(dtype, copy=True), requires_grad=False)
    release_file_pages(bias)


def _int8_forward(layer, x: torch.Tensor, comfy_ops) -> torch.Tensor:
    """The INT8 forward under ComfyUI's memory management: a weight that its partial loading left on another
    device comes over as int8 bytes (with a patched bias) through ComfyUI's caster."""
    if layer.weight_function:
        raise RuntimeError(
            f"INT8 layer got weight functions {[type(f).__name__ for f in layer.weight_function]} from a "
            f"model patcher; headroom's INT8 layers apply LoRAs as side branches only. Load the model "
            f"with 'Load Diffusion Model (INT8)' and apply LoRAs to its output.")
    stream = None
    if layer.weight.device == x.device and not layer.bias_function:
        weight, bias = layer.weight, layer.bias
    else:
        weight, bias, stream = comfy_ops.cast_bias_weight(layer, x, dtype=torch.int8, bias_dtype=x.dtype,
                                                          offloadable=True)
    scale = layer.weight_scale
    if scale.device != x.device:
        scale = scale.to(x.device, non_blocking=True)
    compute = layer._config.compute
    if compute == "auto":
        y = layer.int8_forward(x, weight, scale, bias)
    else:  # the kernel chosen for THIS model, for this call only (another model may sample with another)
        with force_kernel(compute):
            y = layer.int8_forward(x, weight, scale, bias)
    if stream is not None:
        comfy_ops.uncast_bias_weight(layer, weight, bias, stream)
    return y


MERGE_REFUSED = (
    "An INT8 layer loaded by 'Load Diffusion Model (INT8)' / 'Load CLIP (INT8)' was asked to merge a weight patch "
    "({in_features}->{out_features}). INT8 layers take LoRAs as float side branches through headroom's model "
    "patcher; the model seems to be driven by a different ModelPatcher here. Apply LoRAs with 'LoRA Loader (INT8)' "
    "or ComfyUI's LoraLoader directly on the loader's output.")


# ---------------------------------------------------------------------------------------------------
# The layer classes (built once, on first use, because they subclass ComfyUI's)
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _base_classes():
    """(Linear, Embedding) base classes subclassing ComfyUI's ``manual_cast`` ones."""
    import comfy.ops as comfy_ops

    class HeadroomLinear(Int8Linear, comfy_ops.CastWeightBiasOp):
        """INT8 when the load decides so (``weight_scale`` set), else ComfyUI's float ``manual_cast.Linear``."""

        comfy_cast_weights = True
        _config: Int8LoadConfig = Int8LoadConfig()
        _log: LoadLog = LoadLog()
        _name_prefix = ""

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            _init_unloaded(self, in_features, out_features, bias, dtype)

        @property
        def is_int8(self) -> bool:
            return self.weight_scale is not None

        def reset_parameters(self):
            return None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            _load_linear(self, state_dict, prefix, missing_keys)

        # -- ComfyUI's patch hooks: INT8 weights are never merged ------------------------------------
        def convert_weight(self, weight, inplace=False, **kwargs):
            """ComfyUI hands us ``weight`` cast to float: for an INT8 layer that is the raw int8 values."""
            if not self.is_int8:
                return weight
            return dequantize_unrotated(weight.round().to(torch.int8), self.weight_scale.to(weight.device),
                                        self.rotation_group, weight.dtype, self.block_size)

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            if return_weight:
                return weight
            if self.is_int8:
                raise RuntimeError(MERGE_REFUSED.format(in_features=self.in_features, out_features=self.out_features))
            self.weight = nn.Parameter(weight.to(self.weight.dtype), requires_grad=False)
            return None

        def forward(self, x, *args, **kwargs):
            comfy_ops.run_every_op()
            if self.is_int8:
                return _int8_forward(self, x, comfy_ops)
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return comfy_ops.manual_cast.Linear.forward_comfy_cast_weights(self, x)
            return torch.nn.functional.linear(x, self.weight, self.bias)

        def extra_repr(self):
            if not self.is_int8:
                return f"in_features={self.in_features}, out_features={self.out_features}, float"
            return Int8Linear.extra_repr(self)

    class HeadroomEmbedding(comfy_ops.manual_cast.Embedding):
        """ComfyUI's embedding; an INT8 table in the file is dequantized (un-rotated): embeddings stay float."""

        _config: Int8LoadConfig = Int8LoadConfig()

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            stored = _take_int8_layer(state_dict, prefix, _module_name("", prefix), self._config.file_metadata)
            if stored is not None:
                state_dict[prefix + "weight"] = stored.dequantized()
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)

    return HeadroomLinear, HeadroomEmbedding


def make_int8_ops(config: Int8LoadConfig | None = None, record: LoadLog | None = None, name_prefix: str = ""):
    """The ``custom_operations`` class for one load (its layers share ``config`` and report to ``record``)."""
    import comfy.ops as comfy_ops

    config = config or Int8LoadConfig()
    record = record if record is not None else LoadLog()
    base_linear, base_embedding = _base_classes()
    linear = type("Linear", (base_linear,), {"_config": config, "_log": record, "_name_prefix": name_prefix})
    embedding = type("Embedding", (base_embedding,), {"_config": config})
    ops = type("HeadroomInt8Ops", (comfy_ops.manual_cast,), {"Linear": linear, "Embedding": embedding,
                                                             "headroom_config": config, "headroom_log": record})
    return ops


__all__ = [
    "Int8LoadConfig",
    "Int8LoadError",
    "LoadLog",
    "METHODS",
    "NATIVE_SKIP_PATTERNS",
    "MODULATION_PATTERNS",
    "native_skip_patterns",
    "TEXT_ENCODER_SKIP_PATTERNS",
    "WEIGHT_FORMATS",
    "make_int8_ops",
]
