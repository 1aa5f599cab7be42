"""Our INT8 engine for HunyuanImage-3 (``int8_engine="headroom"``): W8A8 layers, stacked experts, one tensor at a time.

bitsandbytes' LLM.int8 runs this model at a third of bf16's speed; our row-wise W8A8 kernels run faster than bf16.
The load does not go through ``from_pretrained`` (which would first hold the 160 GB bf16 model somewhere):

1. the model is built on the meta device (names and shapes, no memory); every Linear the skip plan quantizes
   becomes an :class:`~comfyui_headroom.quant.linear.Int8Linear`, and each MoE layer's 64 experts become one
   :class:`~comfyui_headroom.integrations.hunyuan3.moe.StackedExperts` of two
   :class:`~comfyui_headroom.quant.grouped.Int8GroupedLinear` (the grouped kernel's weights);
2. placement from the INT8 sizes: everything that is not a decoder layer plus as many layers as the budget
   holds go to the GPU, the rest to RAM (streamed from pinned memory afterwards, memory/streaming.py);
3. each tensor of the safetensors files is read (memory-mapped), quantized row-wise on the GPU when there is one,
   and written into its place: peak RAM is the part of the INT8 model that lives in RAM plus one tensor.
   A folder written by ``headroom convert`` (our format: int8 ``weight`` + float32 ``weight_scale``) is read
   without quantizing again.
Every parameter must be filled from the files; what is missing is named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ...kernels.int8 import dequantize_weight, normalise_scale, quantize_weight
from ...quant.formats.metadata import is_headroom_metadata
from ...quant.grouped import Int8GroupedLinear
from ...quant.linear import Int8Linear
from .inputs import LoaderError
from .moe import StackedExperts, is_tencent_moe

log = logging.getLogger("comfyui_headroom")

ENGINES = ("headroom", "bitsandbytes")
SCALE_SUFFIX = "weight_scale"


def swap_in_int8_layers(skeleton: nn.Module, quantize: Sequence[str]) -> dict[str, int]:
    """On the meta skeleton: the planned Linear layers become :class:`Int8Linear`, each MoE's experts one stack.

    A MoE's experts are stacked only when all of them are planned for quantization (else they stay per-expert
    float layers). Returns counts: ``{"linear": n, "stacked_moe": m}``."""
    planned = set(quantize)
    counts = {"linear": 0, "stacked_moe": 0}
    for name, module in list(skeleton.named_modules()):
        if not is_tencent_moe(module):
            continue
        mlps = list(module.experts)
        names = [f"{name}.experts.{e}.{proj}" for e in range(len(mlps)) for proj in ("gate_and_up_proj", "down_proj")]
        if not all(n in planned for n in names):
            continue
        up, down = mlps[0].gate_and_up_proj, mlps[0].down_proj
        module.experts = StackedExperts(Int8GroupedLinear(len(mlps), up.in_features, up.out_features, device="meta"),
                                        Int8GroupedLinear(len(mlps), down.in_features, down.out_features,
                                                          device="meta"))
        planned.difference_update(names)
        counts["stacked_moe"] += 1
    for name in sorted(planned):
        try:
            linear = skeleton.get_submodule(name)
        except AttributeError:
            continue
        if type(linear) is not nn.Linear:
            continue
        layer = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, child, layer)
        counts["linear"] += 1
    return counts


def allocate(model: nn.Module, device_of: Callable[[str], torch.device | None]) -> set[str]:
    """Give every meta tensor uninitialised storage on its device (``device_of(full name)``); tensors the model's
    code created for real (non-persistent buffers such as RoPE tables) move there. ``device_of`` None: the tensor
    stays as it is (a disk-tier layer: on meta, streamed from a file later). Returns the allocated names: the
    ones the files must fill."""
    empty: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            device = device_of(prefix + key)
            if device is None:
                continue
            if param.device.type == "meta":
                module._parameters[key] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                empty.add(prefix + key)
            elif param.device != device:
                module._parameters[key] = nn.Parameter(param.data.to(device), requires_grad=False)
        for key, buf in list(module._buffers.items()):
            if buf is None:
                continue
            device = device_of(prefix + key)
            if device is None:
                continue
            if buf.device.type == "meta":
                module._buffers[key] = torch.empty_like(buf, device=device)
                if key not in module._non_persistent_buffers_set:
                    empty.add(prefix + key)
            elif buf.device != device:
                module._buffers[key] = buf.to(device)
    return empty


class _Filler:
    """Writes the files' tensors into the allocated model (see the module docstring, step 3)."""

    def __init__(self, model: nn.Module, work_device: torch.device, skip: Sequence[str] = (),
                 only: str | None = None) -> None:
        self.model = model
        self.skip = tuple(skip)  # key prefixes not read (disk-tier layers: streamed from a file later)
        self.only = only  # read only the keys under this prefix (one layer, for the disk-tier cache)
        self.work = work_device  # where quantization runs (the GPU when there is one)
        self.modules = dict(model.named_modules())
        self.filled: set[str] = set()
        self.quantized_here = 0
        self.read_int8 = 0
        self.ignored: list[str] = []
        self._keys: set[str] = set()  # the open file's tensor names

    def fill_file(self, file: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            ours = is_headroom_metadata(f.metadata())
            keys = list(f.keys())  # the file's own order
            self._keys = set(keys)
            for key in keys:
                if key.endswith(SCALE_SUFFIX) and ours:
                    continue  # read with its weight
                if (self.skip and key.startswith(self.skip)) or (self.only is not None and not key.startswith(self.only)):
                    continue
                self._fill(file, f, key, ours)

    def _fill(self, file: Path, f, key: str, ours: bool) -> None:
        module_name, _, attr = key.rpartition(".")
        expert = _expert_key(module_name)
        if expert is not None:
            stack_name, index, proj = expert
            stack = self.modules.get(f"{stack_name}.{proj}")
            if isinstance(stack, Int8GroupedLinear) and attr == "weight":
                weight, scale = self._int8_pair(file, f, key, ours, module_name)
                if index >= stack.num_groups:
                    raise LoaderError(f"{file}: {key} names expert {index}, the model has {stack.num_groups}")
                _check_shape(file, key, weight, stack.weight[index])
                stack.set_expert(index, *self._rowwise(weight, scale, key, file))
                self.filled.add(f"{stack_name}.{proj}.{index}")
                return
        module = self.modules.get(module_name)
        if isinstance(module, Int8Linear) and attr == "weight":
            weight, scale = self._int8_pair(file, f, key, ours, module_name)
            if weight.dtype != torch.int8:
                weight, scale = quantize_weight(weight.to(self.work), "rowwise")
                self.quantized_here += 1
            _check_shape(file, key, weight, module.weight)
            module.weight.copy_(weight)
            scale = normalise_scale(scale, tuple(weight.shape), f"{module_name}.{SCALE_SUFFIX}")
            if scale.shape != module.weight_scale.shape:
                module.weight_scale = torch.empty_like(scale, device=module.weight.device)
            module.weight_scale.copy_(scale)
            self.filled.update({key, f"{module_name}.{SCALE_SUFFIX}"})
            return
        target = _tensor_of(module, attr)
        if target is None:
            self.ignored.append(key)
            return
        value = f.get_tensor(key)
        if value.dtype == torch.int8 and target.dtype != torch.int8:
            # a layer the skip list keeps float (the router, ...) that the converter quantized: back to float
            weight, scale = self._int8_pair(file, f, key, ours, module_name, weight=value)
            value = dequantize_weight(weight, normalise_scale(scale, tuple(weight.shape), key), torch.float32)
        _check_shape(file, key, value, target)
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        self.filled.add(key)

    def _int8_pair(self, file: Path, f, key: str, ours: bool, module_name: str, weight: torch.Tensor | None = None):
        """(weight, scale): an int8 weight of our format with its scale, or a float weight and None. ``weight``: the
        tensor of ``key`` when the caller read it already."""
        weight = f.get_tensor(key) if weight is None else weight
        if weight.dtype != torch.int8:
            return weight, None
        scale_key = f"{module_name}.{SCALE_SUFFIX}"
        if not ours or scale_key not in self._keys:
            raise LoaderError(f"{file}: {key} is int8 but not in headroom's format (no {scale_key} in a file written "
                              "by headroom convert); convert the float original with `headroom convert`, or load "
                              "this folder with int8_engine=bitsandbytes if bitsandbytes wrote it")
        self.read_int8 += 1
        return weight, f.get_tensor(scale_key)

    def _rowwise(self, weight: torch.Tensor, scale: torch.Tensor | None, key: str, file: Path):
        """An expert's (int8 weight, row-wise scale): float weights are quantized; other INT8 layouts re-quantized."""
        if scale is None:
            self.quantized_here += 1
            return quantize_weight(weight.to(self.work), "rowwise")
        scale = normalise_scale(scale, tuple(weight.shape), key)
        if scale.ndim == 1 and scale.numel() == weight.shape[0]:
            return weight, scale
        self.quantized_here += 1  # block or tensorwise on disk: the grouped kernel takes row-wise scales
        return quantize_weight(dequantize_weight(weight.to(self.work), scale.to(self.work)), "rowwise")

    def missing(self, allocated: set[str]) -> list[str]:
        """Allocated tensors no file filled (an expert stack counts as filled when all its experts were)."""
        left = []
        for name in sorted(allocated):
            module_name, _, attr = name.rpartition(".")
            module = self.modules.get(module_name)
            if isinstance(module, Int8GroupedLinear):
                if not all(f"{module_name}.{e}" in self.filled for e in range(module.num_groups)):
                    left.append(name)
            elif name not in self.filled:
                left.append(name)
        return left


def _expert_key(module_name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.experts.17.down_proj`` -> (``model.layers.3.mlp.experts``, 17, ``down_proj``)."""
    parts = module_name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return ".".join(parts[:-2]), int(parts[-2]), parts[-1]
    return None


def _tensor_of(module: nn.Module | None, attr: str) -> torch.Tensor | None:
    if module is None:
        return None
    if attr in module._parameters and module._parameters[attr] is not None:
        return module._parameters[attr].data
    if attr in module._buffers and module._buffers[attr] is not None:
        return module._buffers[attr]
    return None


def _check_shape(file: Path, key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise LoaderError(f"{file}: {key} has shape {list(value.shape)} but the model's code declares "
                          f"{list(target.shape)}; the folder does not belong to this config.json - re-download it")


def fill_from_files(model: nn.Module, files: Sequence[Path], allocated: set[str], work_device: torch.device,
                    folder: Path, progress: bool = True, skip: Sequence[str] = (), only: str | None = None) -> dict:
    """Read every file into the allocated model; returns counts for the load report. Raises :class:`LoaderError`
    naming the tensors no file holds (after tying the embeddings where the config ties them). ``skip``: key
    prefixes left unread (disk-tier layers); ``only``: read just the keys under this prefix."""
    filler = _Filler(model, work_device, skip, only)
    with torch.no_grad():
        iterator = files
        if progress and len(files) > 1:
            from tqdm import tqdm

            iterator = tqdm(files, desc="headroom INT8 load", unit="shard")
        for file in iterator:
            filler.fill_file(Path(file))
    left = filler.missing(allocated)
    if left and hasattr(model, "tie_weights"):
        model.tie_weights()  # lm_head tied to the embeddings is not stored twice
        left = [n for n in left if not _tied(model, n)]
    if left:
        raise LoaderError(f"{folder}: {len(left)} tensors the model needs are in none of its weight files "
                          f"(e.g. {left[:4]}); the download is incomplete - re-download the safetensors shards")
    if filler.ignored:
        log.info("headroom INT8 load: %d tensors in the files belong to no module (e.g. %s), ignored",
                 len(filler.ignored), filler.ignored[:3])
    return {"quantized_on_load": filler.quantized_here, "read_as_int8": filler.read_int8,
            "ignored": len(filler.ignored)}


def _tied(model: nn.Module, name: str) -> bool:
    """True when ``name`` now shares storage with another, filled tensor (tie_weights did it)."""
    module_name, _, attr = name.rpartition(".")
    tensor = _tensor_of(model.get_submodule(module_name) if module_name else model, attr)
    if tensor is None:
        return False
    ptr = tensor.data_ptr()
    return sum(1 for _, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() == ptr) > 1


def device_for(layer_devices: dict[int, torch.device], rest: torch.device,
               layers_prefix: str = "model.layers") -> Callable[[str], torch.device]:
    """``device_of(tensor name)``: a decoder layer's tensors where the placement put the layer, the rest on ``rest``."""
    head = layers_prefix + "."

    def device_of(name: str) -> torch.device:
        if name.startswith(head):
            index = name[len(head):].split(".", 1)[0]
            if index.isdigit():
                return layer_devices.get(int(index), rest)
        return rest

    return device_of
