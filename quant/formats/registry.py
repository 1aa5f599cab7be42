"""The format registry: every INT8 layout headroom knows is an :class:`Int8Format` registered by name.

Readers ask the registry which format a layer is in (:func:`layer_format`, most specific format first) and let
that format read it (:func:`parse_int8_layer`); the converter asks it which layouts it can write
(:func:`writable_formats`) and lets the chosen format lay out each quantized layer. Adding a format = one
module with an :class:`Int8Format` subclass and one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass

import torch

from ...kernels.int8 import (
    DEFAULT_BLOCK_SIZE,
    block_size_of,
    method_of_scale,
    normalise_scale,
    scale_shape,
)
from ...kernels.rotation import dequantize_unrotated
from ..safetensors_stream import TensorInfo
from .metadata import recorded_block_size

SCALE_SUFFIXES = ("weight_scale", "scale_weight")  # ours/ComfyUI/lightx2v, OneTrainer/old ComfyUI fp8
INPUT_SCALE_SUFFIXES = ("input_scale", "scale_input")  # static activation scales: we quantize activations ourselves
FP8_MARKER_KEY = "scaled_fp8"  # old ComfyUI scaled-fp8 files carry this marker tensor (fp8 is read as float)


@dataclass
class Int8LayerTensors:
    """One INT8 layer as read from a file, with the scale normalised to our layout."""

    weight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32: [] tensorwise, [out] rowwise, [out, nblocks] block
    block_size: int
    source_format: str  # the name of the registered format that read it
    rotation_group: int  # > 0: the weight is stored Hadamard-rotated in groups of this size (ComfyUI's convrot)
    consumed_keys: list[str]  # every key used (weight, scale, comfy_quant, input scales)

    @property
    def method(self) -> str:
        return method_of_scale(self.scale, self.weight.shape[0])

    @property
    def convrot(self) -> bool:
        """The weight lives in a rotated basis (it must be un-rotated, or its input rotated)."""
        return self.rotation_group > 0

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in the plain basis (un-rotated when stored rotated)."""
        return dequantize_unrotated(self.weight, self.scale, self.rotation_group, dtype, self.block_size)


def find_scale_key(keys: Container[str], prefix: str, suffixes: tuple[str, ...] = SCALE_SUFFIXES) -> str | None:
    """The first ``prefix + suffix`` present in ``keys`` (a state dict, a header's tensors, a lazy reader)."""
    for suffix in suffixes:
        if prefix + suffix in keys:
            return prefix + suffix
    return None


class Int8Format:
    """One way of storing an INT8 Linear layer ``<p>`` in a safetensors file.

    Every format keeps the int8 weight at ``<p>weight`` as ``[out, in]``; formats differ in where the scale is and
    how it is shaped, and in what marks a layer as theirs (a per-layer tensor, the header's metadata, nothing).
    Subclasses set the class attributes and override what differs from the defaults below.
    """

    name: str = ""  # the layers' source_format; the --layout name of a format that writes
    label: str = ""  # what `headroom inspect` calls a file in this format (default: name)
    priority: int = 0  # detection order, highest first: per-layer markers before header-wide ones before none
    summary: str = ""  # one line for the --layout help and the save node's tooltip
    scale_suffixes: tuple[str, ...] = SCALE_SUFFIXES  # where the scale may be; the first is where it is written
    marker_suffixes: tuple[str, ...] = ()  # other per-layer keys the format reads (ComfyUI's comfy_quant)
    writable: bool = False
    methods: tuple[str, ...] = ()  # the methods it can write
    rotation_groups: tuple[int, ...] = ()  # the rotation groups it can write (none: no rotated weights)

    @property
    def file_label(self) -> str:
        return self.label or self.name

    # -- detection --------------------------------------------------------------------------------------
    def owns_layer(self, keys: Container[str], prefix: str, file_metadata: Mapping[str, str] | None) -> bool:
        """Whether the INT8 layer at ``prefix`` (a state dict's or a header's keys) is stored in this format."""
        raise NotImplementedError

    def owns_header_key(self, key: str) -> bool:
        """Whether a header metadata key describes this format's quantization (a converted file drops it)."""
        return False

    # -- reading ----------------------------------------------------------------------------------------
    def scale_key(self, keys: Container[str], prefix: str) -> str | None:
        return find_scale_key(keys, prefix, self.scale_suffixes)

    def our_scale(self, stored: torch.Tensor, weight_shape: tuple[int, int], key: str) -> torch.Tensor:
        """The stored scale as ours (float32 ``[]``, ``[out]`` or ``[out, nblocks]``); works on meta tensors too,
        so a header alone says the method. ValueError naming ``key`` when it does not fit the weight (never
        broadcast) or is not a float tensor."""
        if not stored.dtype.is_floating_point:
            raise ValueError(f"INT8 scale '{key}' is {str(stored.dtype).replace('torch.', '')}, not a float tensor; "
                             f"the file is damaged or in a layout headroom does not know")
        return normalise_scale(stored, weight_shape, key)

    def rotation_group(self, tensors: Mapping[str, torch.Tensor], prefix: str,
                       file_metadata: Mapping[str, str] | None = None) -> int:
        """The layer's Hadamard rotation group (0: plain) from what marks it (a small marker tensor, the header);
        reads no weight, so ``headroom inspect`` can ask it of a lazy reader. ValueError naming the tensor when
        the marker is damaged or names a rotation headroom cannot undo."""
        return 0

    def read(self, tensors: Mapping[str, torch.Tensor], prefix: str,
             file_metadata: Mapping[str, str] | None = None) -> Int8LayerTensors | None:
        """The layer at ``prefix`` as our tensors; None when its weight is not int8."""
        if tensors[prefix + "weight"].dtype != torch.int8:
            return None
        return self.int8_layer(tensors, prefix, file_metadata)

    def int8_layer(self, tensors: Mapping[str, torch.Tensor], prefix: str, file_metadata: Mapping[str, str] | None,
                   rotation_group: int = 0) -> Int8LayerTensors:
        """What every format reads alike: the int8 weight, its scale (found, normalised), the block size and the
        keys used. ValueError naming the tensor when the weight is not 2-D or its scale is missing or misfit."""
        weight_key = prefix + "weight"
        weight = tensors[weight_key]
        if weight.ndim != 2:
            raise ValueError(f"INT8 tensor '{weight_key}' has shape {tuple(weight.shape)}; expected [out, in]")
        scale_key = self.scale_key(tensors, prefix)
        if scale_key is None:
            where = " or ".join(f"'{prefix}{suffix}'" for suffix in self.scale_suffixes)
            raise ValueError(f"INT8 tensor '{weight_key}' has no scale ({where}); the file is incomplete or in a "
                             f"layout headroom does not know")
        scale = self.our_scale(tensors[scale_key], tuple(weight.shape), scale_key)
        default_block = recorded_block_size(file_metadata)
        block_size = block_size_of(weight.shape[1], scale, default_block) if scale.ndim == 2 else default_block
        consumed = [weight_key, scale_key]
        consumed += [prefix + s for s in INPUT_SCALE_SUFFIXES + self.marker_suffixes if prefix + s in tensors]
        return Int8LayerTensors(weight, scale, block_size, self.name, rotation_group, consumed)

    # -- writing ----------------------------------------------------------------------------------------
    def check_write(self, method: str, rotation_group: int = 0) -> None:
        """ValueError saying what to choose instead when this format cannot store layers quantized so."""
        if method not in self.methods:
            raise ValueError(f"the {self.name} layout cannot store {method} scales: use --method "
                             f"{' or '.join(self.methods)} with --layout {self.name}")
        if rotation_group and rotation_group not in self.rotation_groups:
            if not self.rotation_groups:
                raise ValueError(f"--rotate {rotation_group}: the {self.name} layout cannot store Hadamard-rotated "
                                 f"weights")
            raise ValueError(f"--rotate {rotation_group}: the {self.name} layout supports group sizes "
                             f"{', '.join(map(str, self.rotation_groups))}; got {rotation_group}")

    def output_tag(self, method: str) -> str:
        """What a converted file's default name says: ``model-int8-<tag>.safetensors``."""
        return self.name

    def scale_shape(self, method: str, out_features: int, in_features: int, block_size: int) -> tuple[int, ...]:
        """The shape the scale of a layer quantized with ``method`` has in this format's files."""
        return scale_shape(method, out_features, in_features, block_size)

    def layer_tensors(self, prefix: str, weight: torch.Tensor, scale: torch.Tensor, method: str,
                      block_size: int = DEFAULT_BLOCK_SIZE, rotation_group: int = 0) -> dict[str, torch.Tensor]:
        """The tensors of one quantized layer in an output file, in write order (``scale`` is ours)."""
        out_features, in_features = weight.shape
        stored = scale.reshape(self.scale_shape(method, out_features, in_features, block_size))
        return {prefix + "weight": weight, prefix + self.scale_suffixes[0]: stored}

    def layer_infos(self, prefix: str, weight_shape: tuple[int, int], method: str, block_size: int = DEFAULT_BLOCK_SIZE,
                    rotation_group: int = 0) -> dict[str, TensorInfo]:
        """Dtypes and shapes of :meth:`layer_tensors` before any data exists (a streamed file's header)."""
        out_features, in_features = weight_shape
        weight = torch.empty(weight_shape, dtype=torch.int8, device="meta")
        scale = torch.empty(scale_shape(method, out_features, in_features, block_size), dtype=torch.float32,
                            device="meta")
        tensors = self.layer_tensors(prefix, weight, scale, method, block_size, rotation_group)
        return {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------

_FORMATS: list[Int8Format] = []  # in registration order (the order --layout lists the writable ones)


def register(fmt: Int8Format) -> Int8Format:
    """Add a format (its name must be new); returns it."""
    if not fmt.name:
        raise ValueError(f"{type(fmt).__name__} has no name")
    if any(known.name == fmt.name for known in _FORMATS):
        raise ValueError(f"an INT8 format named '{fmt.name}' is already registered")
    _FORMATS.append(fmt)
    return fmt


def unregister(name: str) -> Int8Format:
    """Remove the format ``name`` (tests register a toy format and take it back); returns it."""
    fmt = get_format(name)
    _FORMATS.remove(fmt)
    return fmt


def registered_formats() -> tuple[Int8Format, ...]:
    return tuple(_FORMATS)


def get_format(name: str) -> Int8Format:
    for fmt in _FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown INT8 format '{name}'; known: {', '.join(f.name for f in _FORMATS)}")


def writable_formats() -> tuple[Int8Format, ...]:
    """The formats the converter can write, in registration order."""
    return tuple(fmt for fmt in _FORMATS if fmt.writable)


def layout_names() -> tuple[str, ...]:
    """The ``--layout`` choices: names of the writable formats."""
    return tuple(fmt.name for fmt in writable_formats())


def layer_format(keys: Container[str], prefix: str, file_metadata: Mapping[str, str] | None = None) -> Int8Format:
    """The format of the INT8 layer at ``prefix`` (ending in a dot), the most specific claim first."""
    for fmt in sorted(_FORMATS, key=lambda f: -f.priority):
        if fmt.owns_layer(keys, prefix, file_metadata):
            return fmt
    raise ValueError(f"no registered INT8 format reads the layer '{prefix}weight'")


def parse_int8_layer(
    tensors: Mapping[str, torch.Tensor], prefix: str, file_metadata: Mapping[str, str] | None = None
) -> Int8LayerTensors | None:
    """Read the INT8 layer at ``prefix`` (trailing dot) in any registered format; None when its weight is not int8.

    ``tensors`` may be a state dict or a lazy mapping (:class:`~..safetensors_stream.TensorReader`);
    ``file_metadata`` is the safetensors header metadata (needed for header-described formats and for our
    block size). Raises ValueError naming the tensor when an INT8 weight cannot be used (no or a misfit scale,
    a rotation headroom cannot undo, a ComfyUI format headroom cannot read).
    """
    if prefix + "weight" not in tensors:
        return None
    return layer_format(tensors, prefix, file_metadata).read(tensors, prefix, file_metadata)


def quantization_keys(keys: Container[str], prefix: str) -> list[str]:
    """The keys next to ``<prefix>weight`` that describe how it is quantized, in any registered format (scales,
    input scales, markers): what a weight no longer needs once it is float."""
    suffixes = dict.fromkeys(s for fmt in _FORMATS for s in fmt.scale_suffixes)
    suffixes.update(dict.fromkeys(SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES))
    suffixes.update(dict.fromkeys(s for fmt in _FORMATS for s in fmt.marker_suffixes))
    return [prefix + s for s in suffixes if prefix + s in keys]
