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
are not a plain low-rank product (DoRA, LoHa, LoKr, full diffs) are refused by name.

Streaming: :meth:`LoraMerger.merge_rows` adds the LoRA to a chunk of rows of one weight, so the converter's
memory bound (a few chunks) holds; the LoRA tensors of one layer are read when that layer is reached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

# suffix -> role; longest first so ".lora_down.weight" wins over ".weight"
_PART_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED_MARKERS = ("dora_scale", "hada_", "lokr_", ".diff", ".diff_b", ".oft_", ".boft_", ".glora_")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.|te\d?\.|lora_te_|text_encoders?\.)")


class LoraError(ValueError):
    """A LoRA cannot be baked (no matching layer, wrong shapes, unsupported variant): the message names it."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the strength it is merged with."""

    path: Path
    strength: float = 1.0

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
    unmatched: list[str] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)


def _parse_file(spec: LoraSpec) -> _LoraFile:
    from .safetensors_stream import read_header

    header = read_header(spec.path)  # FormatError for a missing file, a pickle or a corrupt header
    path, keys = header.path, list(header.tensors)
    pairs: dict[str, _Pair] = {}
    ignored, unsupported, stray = 0, [], []
    for key in keys:
        if _TEXT_ENCODER.match(key):
            ignored += 1
            continue
        for suffix, role in _PART_SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                setattr(pairs.setdefault(base, _Pair(base)), role, key)
                break
        else:
            (unsupported if any(m in key for m in _UNSUPPORTED_MARKERS) else stray).append(key)
    if unsupported:
        raise LoraError(f"LoRA {path} uses a variant headroom cannot bake into INT8 (DoRA / LoHa / LoKr / full "
                        f"diffs), e.g. {', '.join(unsupported[:3])}; merge it in ComfyUI and save with "
                        f"'Save INT8 Model' instead")
    incomplete = [p.base for p in pairs.values() if p.down is None or p.up is None]
    if incomplete:
        raise LoraError(f"LoRA {path} has modules without both down and up weights: {', '.join(incomplete[:5])}"
                        f"{' ...' if len(incomplete) > 5 else ''}; the file is damaged or not a LoRA")
    if not pairs and not ignored:
        raise LoraError(f"{path} contains no LoRA weights (expected keys like '<layer>.lora_down.weight' or "
                        f"'<layer>.lora_A.weight'); first keys: {', '.join(keys[:5]) or 'none'}")
    if stray and not pairs:
        raise LoraError(f"LoRA {path}: unrecognised keys such as {', '.join(stray[:3])}")
    return _LoraFile(spec, pairs, ignored_text_encoder=ignored)


class LoraMerger:
    """Merge one or more LoRA files into a checkpoint's weights, one weight (or chunk of rows) at a time."""

    def __init__(self, specs: Iterable[LoraSpec | str | os.PathLike]) -> None:
        self.files = [_parse_file(_as_spec(s)) for s in specs]
        self._by_target: dict[str, list[tuple[_LoraFile, _Pair]]] = {}
        self._cache: tuple[str, torch.device, list] | None = None

    def __bool__(self) -> bool:
        return bool(self.files)

    # -- matching ----------------------------------------------------------------------------------------
    def bind(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Match every LoRA module to a weight of the checkpoint (``{tensor name: shape}``) and check shapes.

        Raises :class:`LoraError` when a LoRA matches no weight at all, or when shapes do not fit.
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
        bad_shapes: list[str] = []
        for lora in self.files:
            lora.unmatched, lora.touched = [], set()
            for pair in lora.pairs.values():
                target = self._match(pair.base, dotted, underscored)
                if target is None:
                    lora.unmatched.append(pair.base)
                    continue
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
        from safetensors import safe_open

        factors = []
        for lora, pair in self._by_target.get(key, []):
            with safe_open(str(lora.spec.path), "pt") as f:
                down = f.get_tensor(pair.down).float()
                up = f.get_tensor(pair.up).float()
                alpha = float(f.get_tensor(pair.alpha).float().reshape(-1)[0]) if pair.alpha else None
            rank = down.shape[0]
            scale = lora.spec.strength * ((alpha / rank) if alpha is not None else 1.0)
            factors.append(((up.flatten(1) * scale).to(device), down.flatten(1).to(device)))
        self._cache = (key, device, factors)
        return factors

    def merge_rows(self, key: str, rows: torch.Tensor, start: int) -> torch.Tensor:
        """``rows`` = float32 rows ``start:start+len(rows)`` of weight ``key`` (2-D view), with the LoRAs added."""
        if key not in self._by_target:
            return rows
        stop = start + rows.shape[0]
        flat = rows.reshape(rows.shape[0], -1)
        for up, down in self._factors(key, rows.device):
            flat = flat + up[start:stop] @ down
        return flat.reshape(rows.shape)

    def merge_full(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A whole (float) weight with the LoRAs added, back in its own dtype (for weights kept in float)."""
        if key not in self._by_target:
            return tensor
        return self.merge_rows(key, tensor.float(), 0).to(tensor.dtype)

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
    """Merge LoRAs into an in-memory state dict (tests, small models). Returns the bound merger for its summary."""
    merger = LoraMerger(specs)
    merger.bind({k: tuple(v.shape) for k, v in state_dict.items()})
    for key in list(state_dict):
        if merger.targets(key):
            state_dict[key] = merger.merge_full(key, state_dict[key])
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
        return tensor.detach().to("cpu", info.dtype)

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
        return patch(key, weight) if patch is not None else weight

    return ModelTensorSource(name, infos, compute)


def parse_lora_args(values: Iterable[str] | None) -> list[LoraSpec]:
    """CLI ``--lora FILE[:STRENGTH]`` values -> specs (a missing file is reported by :class:`LoraMerger`)."""
    return [LoraSpec.parse(v) for v in (values or [])]


__all__ = ["LoraError", "LoraMerger", "LoraSpec", "ModelTensorSource", "merge_lora_into_state_dict", "model_tensor_source",
           "parse_lora_args"]
