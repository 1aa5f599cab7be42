"""Bake float LoRAs into a checkpoint's weights while it is converted (``headroom convert --lora FILE[:S]``).

A LoRA file holds, per target layer, ``down [r, in]``, ``up [out, r]`` and optionally ``alpha``; the merged
weight is ``W + strength * (alpha / r) * up @ down`` (alpha defaults to r), computed in float32. Key styles
read (those ComfyUI accepts for diffusion models, when the LoRA's layer names are the checkpoint's own):

* kohya / OneTrainer / LyCORIS: ``lora_unet_<name_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (also ``lora_transformer_`` and ``lycoris_`` prefixes);
* ComfyUI: ``diffusion_model.<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
* diffusers / PEFT: ``<prefix>.<name>.lora_A.weight`` / ``.lora_B.weight`` (``transformer.``,
  ``base_model.model.``, ``unet.``, ``diffusion_model.`` or none), and ``.lora.down`` / ``.lora.up``.

Keys of text-encoder LoRA parts (``lora_te*``, ``text_encoder*``) are ignored and counted. LoRA variants that
are not a plain low-rank product (DoRA, LoHa, LoKr, Tucker mid factors, full diffs) are refused by name, and so
is any other key of a module that this file does not know how to bake (never silently ignored).

Quantized LoRAs (INT8 factors with ``weight_scale`` / ``comfy_quant``, as INT8 LoRA packs ship them; fp8
factors with a scale) are dequantized before the merge. Every factor and alpha of a matched module is read and
checked when the merger is bound, before anything is written: a NaN/inf, an alpha that is not one finite
number, a factor that is neither float nor INT8 is a :class:`LoraError` naming the file and the tensor.

Streaming: :meth:`LoraMerger.merge_rows` adds the LoRA to a chunk of rows of one weight, so the converter's
memory bound (a few chunks) holds; the LoRA tensors of one layer are read when that layer is reached.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..kernels.int8 import FP8_DTYPES
from .report import nonfinite
from .safetensors_stream import FormatError

# suffix -> role; longest first so ".lora_down.weight" wins over ".weight"
_PART_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED_MARKERS = ("dora_scale", "hada_", "lokr_", ".diff", ".diff_b", ".oft_", ".boft_", ".glora_", ".lora_mid.",
                        ".w_norm", ".b_norm")
# Keys that travel with a quantized factor ``<factor>.weight`` as ``<factor>.<extra>``.
_QUANT_EXTRAS = ("weight_scale", "scale_weight", "comfy_quant", "input_scale", "scale_input")
MAX_STRENGTH = 100.0  # ComfyUI's LoRA loader accepts -100 .. 100
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.|te\d?\.|lora_te_|text_encoders?\.)")


class LoraError(FormatError):
    """A LoRA cannot be baked (no matching layer, wrong shapes, unsupported variant, damaged values): the message
    names the file and the tensor. A :class:`FormatError` (so a ``ValueError``): whoever reports a bad input
    file reports a bad LoRA file the same way, also when it is found in the middle of a conversion."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the strength it is merged with."""

    path: Path
    strength: float = 1.0

    def __post_init__(self) -> None:
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
                or abs(strength) > MAX_STRENGTH:
            raise LoraError(f"LoRA {self.path}: strength {strength!r} is not usable; give a number from "
                            f"{-MAX_STRENGTH:g} to {MAX_STRENGTH:g} (FILE:STRENGTH, e.g. {Path(self.path).name}:0.8)")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``FILE`` or ``FILE:STRENGTH`` (a Windows drive letter ``C:`` is not mistaken for a strength)."""
        path, strength = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and not re.fullmatch(r"[A-Za-z]", head):
            try:
                path, strength = head, float(tail)
            except ValueError:
                path = text
        return cls(Path(path), strength)

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.strength:g}"


def _as_spec(value) -> LoraSpec:
    if isinstance(value, LoraSpec):
        return value
    if isinstance(value, os.PathLike):
        return LoraSpec(Path(value))
    return LoraSpec.parse(str(value))


def _layer_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _strip_dotted(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _DOTTED_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


@dataclass
class _Pair:
    """One LoRA module: where its tensors are, and what it targets once bound."""

    base: str
    down: str | None = None
    up: str | None = None
    alpha: str | None = None
    target: str | None = None  # the checkpoint's weight key


@dataclass
class _LoraFile:
    spec: LoraSpec
    pairs: dict[str, _Pair]
    ignored_text_encoder: int = 0
    keys: frozenset[str] = frozenset()
    metadata: dict = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)


def _parse_file(spec: LoraSpec) -> _LoraFile:
    from .safetensors_stream import read_header

    header = read_header(spec.path)  # FormatError for a missing file, a pickle or a corrupt header
    path, keys = header.path, list(header.tensors)
    key_set = frozenset(keys)
    pairs: dict[str, _Pair] = {}
    ignored, unsupported, stray, text_encoder = 0, [], [], []
    for key in keys:
        if _TEXT_ENCODER.match(key):
            ignored += 1
            text_encoder.append(key)
            continue
        for suffix, role in _PART_SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                setattr(pairs.setdefault(base, _Pair(base)), role, key)
                break
        else:
            if _quant_extra_of(key, key_set):
                continue
            (unsupported if any(m in key for m in _UNSUPPORTED_MARKERS) else stray).append(key)
    if unsupported:
        raise LoraError(f"LoRA {path} uses a variant headroom cannot bake into INT8 (DoRA / LoHa / LoKr / Tucker / "
                        f"full diffs), e.g. {', '.join(unsupported[:3])}; merge it in ComfyUI and save with "
                        f"'Save INT8 Model' instead")
    unknown_parts = [k for k in stray if _module_of(k, pairs)]
    if unknown_parts:
        raise LoraError(f"LoRA {path} has parts headroom does not know how to bake: {', '.join(unknown_parts[:3])}"
                        f"{' ...' if len(unknown_parts) > 3 else ''} (only down/up weights, alpha and INT8 scales are "
                        "merged; ignoring the rest would give a different model); merge it in ComfyUI and save with "
                        "'Save INT8 Model' instead")
    incomplete = [p.base for p in pairs.values() if p.down is None or p.up is None]
    if incomplete:
        raise LoraError(f"LoRA {path} has modules without both down and up weights: {', '.join(incomplete[:5])}"
                        f"{' ...' if len(incomplete) > 5 else ''}; the file is damaged or not a LoRA")
    if not pairs and not ignored:
        raise LoraError(f"{path} contains no LoRA weights (expected keys like '<layer>.lora_down.weight' or "
                        f"'<layer>.lora_A.weight'); first keys: {', '.join(keys[:5]) or 'none'}")
    if stray and not pairs:
        raise LoraError(f"LoRA {path}: unrecognised keys such as {', '.join(stray[:3])}")
    if not pairs:
        raise LoraError(f"LoRA {path} holds only text-encoder weights ({ignored} keys, e.g. {text_encoder[0]}): "
                        "`headroom convert` bakes LoRAs into the diffusion model only, so nothing of it would be "
                        "merged; load it in ComfyUI to apply it to the text encoder")
    return _LoraFile(spec, pairs, ignored_text_encoder=ignored, keys=key_set, metadata=dict(header.metadata))


def _quant_extra_of(key: str, keys: frozenset[str]) -> bool:
    """``key`` is the scale / config of a quantized factor present in the file (``<x>.weight_scale`` next to
    ``<x>.weight`` ...)."""
    for extra in _QUANT_EXTRAS:
        if key.endswith("." + extra) and key[: -len(extra)] + "weight" in keys:
            return True
    return False


def _module_of(key: str, pairs: Mapping[str, _Pair]) -> str | None:
    """The LoRA module (a key of ``pairs``) that ``key`` belongs to, if any."""
    for i, char in enumerate(key):
        if char == "." and key[:i] in pairs:
            return key[:i]
    return None


def _read_factor(lora: _LoraFile, f, key: str) -> torch.Tensor:
    """One down/up factor in float32: INT8 ones dequantized with their scale, fp8 ones scaled; LoraError naming the
    file and tensor for a dtype that is not a LoRA factor and for NaN/inf."""
    from .lora import dequantize_int8_lora

    tensor = f.get_tensor(key)
    prefix = key[: -len("weight")]
    extras = {prefix + e: f.get_tensor(prefix + e) for e in _QUANT_EXTRAS if prefix + e in lora.keys}
    where = f"LoRA {lora.spec.path}, tensor '{key}'"
    dtype = str(tensor.dtype).replace("torch.", "")
    if tensor.dtype == torch.int8:
        try:
            tensor = dequantize_int8_lora({key: tensor, **extras}, lora.metadata)[0][key]
        except ValueError as err:
            raise LoraError(f"{where}: {err}") from None
    elif tensor.dtype in FP8_DTYPES:
        scale = extras.get(prefix + "weight_scale", extras.get(prefix + "scale_weight"))
        tensor = tensor.float()
        if scale is not None:
            if scale.numel() not in (1, tensor.shape[0]):
                raise LoraError(f"{where}: its fp8 scale has shape {tuple(scale.shape)}, which does not fit the factor "
                                f"{tuple(tensor.shape)}; the file is damaged or in a layout headroom does not know")
            scale = scale.float()
            tensor = tensor * (scale.reshape(()) if scale.numel() == 1 else scale.reshape([-1] + [1] * (tensor.ndim - 1)))
    elif not tensor.is_floating_point():
        raise LoraError(f"{where} is {dtype}: a LoRA factor must be float, or INT8 with a weight_scale; the file "
                        "is damaged or in a format headroom cannot bake")
    elif extras:
        raise LoraError(f"{where} is {dtype} but comes with quantization keys ({', '.join(extras)}): a layout "
                        "headroom does not know; merge it in ComfyUI and save with 'Save INT8 Model' instead")
    tensor = tensor.float()
    bad = nonfinite(tensor)
    if bad:
        raise LoraError(f"{where} contains {bad}: the LoRA file is damaged (re-download or re-export it); the "
                        "checkpoint is fine")
    return tensor


def _read_alpha(lora: _LoraFile, f, key: str) -> float:
    """The alpha at ``key``: one finite number, else LoraError naming the file and key."""
    tensor = f.get_tensor(key)
    where = f"LoRA {lora.spec.path}: alpha '{key}'"
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise LoraError(f"{where} is a {str(tensor.dtype).replace('torch.', '')} tensor of shape {list(tensor.shape)}; "
                        "expected one number (usually the LoRA's rank). The file is damaged: re-download or "
                        "re-export it")
    value = float(tensor.float().reshape(()))
    if not math.isfinite(value):
        raise LoraError(f"{where} is {value}, not a finite number. The file is damaged: re-download or re-export it")
    return value


class LoraMerger:
    """Merge one or more LoRA files into a checkpoint's weights, one weight (or chunk of rows) at a time."""

    def __init__(self, specs: Iterable[LoraSpec | str | os.PathLike]) -> None:
        self.files = [_parse_file(_as_spec(s)) for s in specs]
        self._by_target: dict[str, list[tuple[_LoraFile, _Pair]]] = {}
        self._cache: tuple[str, torch.device, list] | None = None
        self._bound = False

    def __bool__(self) -> bool:
        return bool(self.files)

    # -- matching ----------------------------------------------------------------------------------------
    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Match every LoRA module to a weight of the checkpoint (``{tensor name: shape}``) and check shapes.

        Raises :class:`LoraError` when a LoRA matches no weight at all, when two of its modules name the same
        weight, when shapes do not fit, or when a matched module's factors or alpha are damaged (each is read
        and checked here, before anything is written).
        """
        dotted: dict[str, str] = {}
        underscored: dict[str, str] = {}
        for key in shapes:
            if not key.endswith(".weight"):
                continue
            name = _strip_dotted(_layer_name(key))
            dotted.setdefault(name, key)
            underscored.setdefault(name.replace(".", "_"), key)
        self._by_target.clear()
        self._cache = None
        self._bound = False
        bad_shapes: list[str] = []
        for lora in self.files:
            lora.unmatched, lora.touched = [], set()
            claimed: dict[str, str] = {}
            for pair in lora.pairs.values():
                target = self._match(pair.base, dotted, underscored)
                if target is None:
                    lora.unmatched.append(pair.base)
                    continue
                if target in claimed:
                    raise LoraError(f"LoRA {lora.spec.path} has two modules for the checkpoint's '{target}': "
                                    f"'{claimed[target]}' and '{pair.base}' (two key styles in one file?); merging "
                                    "both would apply it twice. Remove one of them")
                claimed[target] = pair.base
                problem = self._shape_problem(lora, pair, tuple(shapes[target]))
                if problem:
                    bad_shapes.append(f"{target} ({lora.spec.path.name}: {problem})")
                    continue
                pair.target = target
                lora.touched.add(target)
                self._by_target.setdefault(target, []).append((lora, pair))
            if lora.pairs and not lora.touched and not bad_shapes:
                examples = ", ".join(list(lora.pairs)[:3])
                model_examples = ", ".join(list(dotted)[:3])
                raise LoraError(f"LoRA {lora.spec.path} matches no layer of the checkpoint: its modules look like "
                                f"'{examples}', the checkpoint's layers like '{model_examples}'. Is it a LoRA for "
                                f"another model (or in a key style that needs ComfyUI's converters)?")
        if bad_shapes:
            raise LoraError(f"LoRA shapes do not fit {len(bad_shapes)} layer(s): {'; '.join(bad_shapes[:8])}"
                            f"{' ...' if len(bad_shapes) > 8 else ''}. Is the LoRA for another model size?")
        for lora, pair in (entry for entries in self._by_target.values() for entry in entries):
            self._read_pair(lora, pair, torch.device("cpu"))  # LoraError now rather than halfway through a write
        self._bound = True

    @staticmethod
    def _match(base: str, dotted: Mapping[str, str], underscored: Mapping[str, str]) -> str | None:
        for prefix in _UNDERSCORE_PREFIXES:
            if base.startswith(prefix):
                return underscored.get(base[len(prefix):])
        return dotted.get(_strip_dotted(base))

    @staticmethod
    def _shape_problem(lora: _LoraFile, pair: _Pair, weight_shape: tuple[int, ...]) -> str | None:
        from safetensors import safe_open

        with safe_open(str(lora.spec.path), "pt") as f:
            down = f.get_slice(pair.down).get_shape()
            up = f.get_slice(pair.up).get_shape()
        if len(down) < 2 or len(up) < 2:
            return f"down {down} / up {up} are not matrices"
        if down[0] == 0:
            return f"rank 0 (down {tuple(down)}, up {tuple(up)})"
        if down[0] != up[1]:
            return f"rank of down {tuple(down)} and up {tuple(up)} differ"
        if len(weight_shape) < 2 or up[0] != weight_shape[0] or \
                int(torch.tensor(down[1:]).prod()) != int(torch.tensor(weight_shape[1:]).prod()):
            return f"up @ down gives [{up[0]}, {'x'.join(map(str, down[1:]))}], weight is {list(weight_shape)}"
        return None

    def targets(self, key: str) -> bool:
        return key in self._by_target

    # -- merging -----------------------------------------------------------------------------------------
    def _factors(self, key: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(up * strength * alpha / r  [out, r],  down [r, in])]`` for ``key``, float32 (one-entry cache)."""
        if self._cache is not None and self._cache[0] == key and self._cache[1] == device:
            return self._cache[2]
        factors = [self._read_pair(lora, pair, device) for lora, pair in self._by_target.get(key, [])]
        self._cache = (key, device, factors)
        return factors

    @staticmethod
    def _read_pair(lora: _LoraFile, pair: _Pair, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up * strength * alpha / r, down)`` of one module, float32 on ``device``; checked (LoraError)."""
        from safetensors import safe_open

        with safe_open(str(lora.spec.path), "pt") as f:
            down = _read_factor(lora, f, pair.down).flatten(1)
            up = _read_factor(lora, f, pair.up).flatten(1)
            alpha = _read_alpha(lora, f, pair.alpha) if pair.alpha else None
        scale = lora.spec.strength * ((alpha / down.shape[0]) if alpha is not None else 1.0)
        return (up * scale).to(device), down.to(device)

    def _blame(self, key: str) -> str:
        return " + ".join(f"{lora.spec.label} ('{pair.base}')" for lora, pair in self._by_target[key])

    def merge_rows(self, key: str, rows: torch.Tensor, start: int) -> torch.Tensor:
        """``rows`` = float32 rows ``start:start+len(rows)`` of weight ``key`` (2-D view), with the LoRAs added.

        LoraError when the sum overflows to inf/NaN although ``rows`` were finite (a NaN already in ``rows`` is
        the checkpoint's, left for the caller to report)."""
        if not self._bound:
            raise LoraError("LoraMerger: call bind(checkpoint shapes) before merging; it matches the LoRA modules "
                            "to the checkpoint's weights and checks them")
        if key not in self._by_target:
            return rows
        stop = start + rows.shape[0]
        flat = rows.reshape(rows.shape[0], -1)
        for up, down in self._factors(key, rows.device):
            flat = flat + up[start:stop] @ down
        bad = nonfinite(flat)
        if bad and not nonfinite(rows):
            raise LoraError(f"'{key}' + LoRA {self._blame(key)} gives {bad} (counting from row {start}): the LoRA's "
                            "values are too large for this weight (a damaged LoRA, or a strength far too high); "
                            "lower the strength or re-export the LoRA")
        return flat.reshape(rows.shape)

    def merge_full(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A whole (float) weight with the LoRAs added, back in its own dtype (for weights kept in float)."""
        if key not in self._by_target:
            return tensor
        merged = self.merge_rows(key, tensor.float(), 0)
        out = merged.to(tensor.dtype)
        if out.is_floating_point() and nonfinite(out) and not nonfinite(merged):
            raise LoraError(f"'{key}' + LoRA {self._blame(key)} exceeds the range of {str(tensor.dtype).replace('torch.', '')}"
                            " that this weight is stored in: lower the strength, or check the LoRA")
        return out

    def done(self) -> None:
        self._cache = None

    # -- report ------------------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """Per LoRA: file, strength, layers touched, modules that matched nothing, ignored text-encoder keys."""
        return [{"lora": str(f.spec.path), "strength": f.spec.strength, "layers_touched": len(f.touched),
                 "unmatched_modules": len(f.unmatched), "unmatched_examples": f.unmatched[:5],
                 "ignored_text_encoder_keys": f.ignored_text_encoder} for f in self.files]

    def summary_lines(self) -> list[str]:
        lines = []
        for entry in self.summary():
            line = f"  LoRA {Path(entry['lora']).name} x{entry['strength']:g}: {entry['layers_touched']} layers merged"
            if entry["unmatched_modules"]:
                line += f", {entry['unmatched_modules']} modules matched nothing (e.g. {entry['unmatched_examples'][0]})"
            if entry["ignored_text_encoder_keys"]:
                line += f", {entry['ignored_text_encoder_keys']} text-encoder keys ignored"
            lines.append(line)
        return lines


def merge_lora_into_state_dict(state_dict: dict[str, torch.Tensor], specs: Iterable[LoraSpec | str]) -> LoraMerger:
    """Merge LoRAs into an in-memory state dict (tests, small models). Returns the bound merger for its summary.

    All or nothing: the dict is updated only once every merge succeeded (a LoraError leaves it as it was)."""
    merger = LoraMerger(specs)
    merger.bind({k: tuple(v.shape) for k, v in state_dict.items()})
    merged = {key: merger.merge_full(key, tensor) for key, tensor in state_dict.items() if merger.targets(key)}
    state_dict.update(merged)
    merger.done()
    return merger


# ---------------------------------------------------------------------------------------------------------
# Baking from a model in memory ("Save INT8 Model"): one patched weight at a time
# ---------------------------------------------------------------------------------------------------------

class ModelTensorSource(Mapping):
    """A model's tensors as the converter's input, each computed only when the writer asks for it.

    ``infos`` gives every output tensor's dtype and shape up front (the writer lays out the file header
    from it); ``__getitem__`` computes one tensor (e.g. dequantize + ComfyUI's LoRA patch calculation) and
    returns it in that dtype. Nothing is kept: peak memory is one weight plus the writer's chunks.
    """

    def __init__(self, name: str, infos: dict, compute) -> None:
        self.name = name
        self.infos = infos
        self._compute = compute

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        tensor = self._compute(key)
        if tuple(tensor.shape) != tuple(info.shape):
            raise LoraError(f"{self.name}: '{key}' came out as {tuple(tensor.shape)}, expected {tuple(info.shape)} "
                            f"(a patch changed the weight's shape); headroom cannot save this model")
        out = tensor.detach().to("cpu", info.dtype)
        narrower = out.is_floating_point() and tensor.is_floating_point() and \
            torch.finfo(out.dtype).max < torch.finfo(tensor.dtype).max
        if narrower and nonfinite(out) and not nonfinite(tensor):
            raise LoraError(f"{self.name}: '{key}' with its patches (LoRA) applied exceeds the range of "
                            f"{str(out.dtype).replace('torch.', '')} it is saved in; lower the LoRA strength")
        return out

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __enter__(self) -> "ModelTensorSource":
        return self

    def __exit__(self, *exc) -> None:
        return None


def model_tensor_source(module: torch.nn.Module, patch=None, name: str = "model",
                        float_dtype: torch.dtype = torch.bfloat16) -> ModelTensorSource:
    """The tensors of ``module`` with LoRA/patches applied, for :func:`.convert.convert_source`.

    ``patch(key, weight_float32) -> weight`` applies the patches of one state-dict key (``None``: none).
    INT8 layers (:class:`~.linear.Int8Linear`) are dequantized - un-rotated if rotated - to ``float_dtype``
    (their bias dtype when they have one) and their scale / rotation keys dropped: the converter
    quantizes them again, with the LoRA inside.
    """
    from .linear import Int8Linear
    from .safetensors_stream import TensorInfo

    int8 = {n: m for n, m in module.named_modules()
            if isinstance(m, Int8Linear) and getattr(m, "weight_scale", None) is not None}
    state = module.state_dict()
    infos: dict = {}
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in int8:
            if leaf in ("weight_scale", "rotation_group"):
                continue
            if leaf == "weight":
                bias = int8[owner].bias
                dtype = bias.dtype if bias is not None and bias.is_floating_point() else float_dtype
                infos[key] = TensorInfo(dtype, tuple(tensor.shape))
                continue
        infos[key] = TensorInfo(tensor.dtype, tuple(tensor.shape))

    def compute(key: str) -> torch.Tensor:
        owner, _, leaf = key.rpartition(".")
        if owner in int8 and leaf == "weight":
            weight = int8[owner].dequantized_weight(torch.float32).cpu()
        else:
            weight = state[key]
            if patch is None or not weight.is_floating_point():
                return weight
            weight = weight.to("cpu", torch.float32, copy=True)
        if patch is None:
            return weight
        patched = patch(key, weight)  # may work in place: the unpatched weight is recomputed when needed
        bad = nonfinite(patched)
        if bad:
            base = int8[owner].dequantized_weight(torch.float32) if owner in int8 and leaf == "weight" else state[key]
            if not nonfinite(base):
                raise LoraError(f"{name}: '{key}' gets {bad}, from its patches (LoRA), while the model's own weight "
                                "is finite: a LoRA applied to the model is damaged or far too strong; remove it or "
                                "lower its strength before saving")
        return patched

    return ModelTensorSource(name, infos, compute)


def parse_lora_args(values: Iterable[str] | None) -> list[LoraSpec]:
    """CLI ``--lora FILE[:STRENGTH]`` values -> specs (a missing file is reported by :class:`LoraMerger`)."""
    return [LoraSpec.parse(v) for v in (values or [])]


__all__ = ["LoraError", "LoraMerger", "LoraSpec", "ModelTensorSource", "merge_lora_into_state_dict", "model_tensor_source",
           "parse_lora_args"]
