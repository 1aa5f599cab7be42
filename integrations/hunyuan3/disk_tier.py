"""Disk tier for HunyuanImage-3 on our INT8 engine (issue #19): decoder layers beyond the RAM budget stay on the
meta device and stream from safetensors files on every pass (memory/disk.py, memory/streaming.py).

* Which layers: :func:`plan_tiers` - the first N decoder layers resident on the device (N from the VRAM budget, as
  without a RAM budget), the streamed ones in pinned RAM up to ``ram_budget_bytes`` (minus the disk read ring),
  the rest on disk (:func:`~comfyui_headroom.memory.planner.plan_placement`).
* What they stream from: a disk layer's tensors must be in a file exactly as the engine holds them (name, dtype,
  bytes). A ``headroom convert`` folder stores them so - INT8 weights and row scales as stored, the experts one
  tensor per expert, which the engine's stacked ``[E, out, in]`` tensors read as E parts (:func:`expert_parts`,
  ``SafetensorsSource(stacked=...)``) - and streams directly (:func:`direct_source`). Anything else (a bf16
  folder, a converted folder whose converter kept a layer float that the engine quantizes, or that holds other
  scale layouts) is written once into a cache folder, layer by layer, by the engine's own filler - so the cached
  bytes are the ones a resident load computes - and streamed from there (:class:`LayerCache`).
* The cache: ``<model folder>.headroom-int8-cache/`` next to the model folder, or - when that parent is not
  writable - ``$HEADROOM_CACHE/<folder name>-<path hash>.headroom-int8-cache/``. One safetensors file per decoder
  layer (written to a temporary name, renamed when complete: quant/atomic.py) and ``manifest.json`` recording the
  source files (name, size, mtime, header sha256), the engine's quantization plan and each layer file's size. A
  later load reuses the layer files while all of that matches, writes the layers it lacks, and starts the cache
  over when the source or the plan changed. A cache file whose size differs from the manifest is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...memory.disk import CACHE_ENV, DiskTierError, SafetensorsSource, cache_root, plan_block_read
from ...memory.planner import DEFAULT_PREFETCH, PlacementPlan, PlanError, plan_placement
from ...memory.streaming import materialize_meta, refs_to_meta
from ...memory.tensors import FlatLayout, collect_tensor_refs
from ...units import GB
from .inputs import LoaderError

log = logging.getLogger("comfyui_headroom")

CACHE_SUFFIX = ".headroom-int8-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"

_EXPERT = re.compile(r"^(.*\.experts)\.(gate_and_up_proj|down_proj)\.(weight|weight_scale)$")


def expert_parts(name: str, shape: tuple[int, ...]) -> list[str] | None:
    """``model.layers.3.mlp.experts.down_proj.weight`` [E, out, in] -> the E file tensors
    ``model.layers.3.mlp.experts.<e>.down_proj.weight`` it is stacked from (how ``headroom convert`` and Tencent's
    release store the experts); None for any other tensor."""
    match = _EXPERT.match(name)
    if match is None or not shape:
        return None
    stack, proj, attr = match.groups()
    return [f"{stack}.{e}.{proj}.{attr}" for e in range(shape[0])]


def plan_tiers(model: nn.Module, device: torch.device, resident: int, ram_budget_bytes: int, layers_prefix: str,
               prefetch: int = DEFAULT_PREFETCH) -> PlacementPlan:
    """The three-tier plan of the decoder layers: the first ``resident`` on ``device``, the streamed ones in RAM
    up to ``ram_budget_bytes``, the rest on disk. Sizes are the engine's INT8 sizes (the skeleton on meta)."""
    try:
        return plan_placement(model, 1 << 62, (), resident, blocks=layers_prefix, devices=[device], prefetch=prefetch,
                              order="first", ram_budget_bytes=ram_budget_bytes)
    except PlanError as err:
        raise LoaderError(f"ram_budget_gb={ram_budget_bytes / GB:.2f}: {err}") from None


def layer_index(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def _layout(layer: nn.Module) -> FlatLayout:
    """The layer's flat layout, its meta tensors given one-element placeholders (no memory)."""
    return FlatLayout(materialize_meta(collect_tensor_refs(layer)))


def direct_source(files: Sequence[Path], model: nn.Module, names: Sequence[str]) -> tuple[SafetensorsSource | None, str]:
    """A source that streams the layers ``names`` straight from ``files`` (as stored), or (None, why not)."""
    try:
        source = SafetensorsSource(files, stacked=expert_parts)
    except (ValueError, OSError) as err:
        return None, str(err)
    try:
        for name in names:
            layer = model.get_submodule(name)
            try:
                plan_block_read(name, _layout(layer), source)
            finally:
                refs_to_meta(collect_tensor_refs(layer))  # back to meta: never loaded
    except DiskTierError as err:
        return None, str(err)
    return source, ""


# ------------------------------------------------------------------------------------------------ the cache


def cache_folder(folder: Path) -> Path:
    """Where the cache of ``folder`` lives (module docstring); LoaderError when nowhere is writable."""
    folder = Path(folder).resolve()
    beside = folder.parent / f"{folder.name}{CACHE_SUFFIX}"
    if beside.is_dir() and os.access(beside, os.W_OK) or os.access(folder.parent, os.W_OK):
        return beside
    if os.environ.get(CACHE_ENV, "").strip():  # only where the user named a cache folder: not ~/.cache by default
        tag = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
        return cache_root() / f"{folder.name}-{tag}{CACHE_SUFFIX}"
    raise LoaderError(f"{folder.parent} is not writable, so the INT8 cache of the decoder layers that stream from "
                      f"disk cannot be written next to the model; set {CACHE_ENV}=<a folder on a fast SSD>, convert "
                      f"the model once with `headroom convert {folder} <new folder>` and load that, or raise "
                      "ram_budget_gb so no layer goes to disk")


def source_identity(files: Sequence[Path]) -> list[dict]:
    """What the cache was made from: each weight file's name, size, mtime and header sha256."""
    from ...quant.safetensors_stream import raw_header_sha256

    out = []
    for path in files:
        st = os.stat(path)
        out.append({"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "header_sha256": raw_header_sha256(path)})
    return out


def plan_identity(quantize: Sequence[str]) -> str:
    """The engine's decisions that shape the cached bytes: which layers are INT8 (row-wise W8A8)."""
    text = json.dumps({"engine": "headroom-int8-rowwise", "quantize": sorted(quantize)})
    return hashlib.sha256(text.encode()).hexdigest()


class LayerCache:
    """One cache folder (module docstring): :meth:`need` the layers to write, :meth:`write_layer`, :meth:`files`."""

    def __init__(self, root: Path, source: list[dict], plan: str):
        self.root = Path(root)
        self.want = {"version": CACHE_VERSION, "source": source, "plan": plan}
        self.layers: dict[str, dict] = {}
        self.started_over = False
        self.written: list[int] = []
        manifest = self._read_manifest()
        if manifest is not None and all(manifest.get(k) == v for k, v in self.want.items()):
            self.layers = dict(manifest.get("layers") or {})
        elif manifest is not None or self.root.exists():
            self.started_over = True  # another source, plan or version: its layer files are stale
            self._clear()

    def _read_manifest(self) -> dict | None:
        try:
            data = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _clear(self) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name == MANIFEST or path.suffix == ".safetensors":
                path.unlink(missing_ok=True)

    def need(self, indices: Sequence[int]) -> list[int]:
        return [i for i in indices if str(i) not in self.layers or not (self.root / self.layers[str(i)]["file"]).exists()]

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        from ...quant.atomic import write_atomically

        name = f"layer-{index:05d}.safetensors"
        dst = self.root / name
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
        write_atomically(dst, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}), needed)
        self.layers[str(index)] = {"file": name, "size": dst.stat().st_size}
        self.written.append(index)
        self._write_manifest()
        return dst

    def _write_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dict(self.want, layers=self.layers), indent=1))
        os.replace(tmp, self.root / MANIFEST)

    def files(self, indices: Sequence[int]) -> list[Path]:
        """The layer files of ``indices``, each checked against the size the manifest recorded."""
        out = []
        for i in indices:
            entry = self.layers[str(i)]
            path = self.root / entry["file"]
            size = path.stat().st_size if path.exists() else -1
            if size != entry["size"]:
                raise LoaderError(f"{path}: the INT8 cache file of decoder layer {i} is {size} bytes, the cache wrote "
                                  f"{entry['size']} (truncated or changed since); delete it (or the folder {self.root}) "
                                  "and load again - the missing layers are written anew")
            out.append(path)
        return out


def fill_layer_from_files(model: nn.Module, name: str, files: Sequence[Path], work: torch.device,
                          folder: Path) -> dict[str, torch.Tensor]:
    """One decoder layer, quantized by the engine's own filler into RAM; -> its tensors by full name (the layer
    goes back to meta afterwards). Peak RAM: one layer."""
    from .int8_engine import allocate, fill_from_files

    layer = model.get_submodule(name)
    cpu = torch.device("cpu")
    allocated = {f"{name}.{n}" for n in allocate(layer, lambda _: cpu)}
    try:
        fill_from_files(model, files, allocated, work, folder, progress=False, only=f"{name}.")
        return {f"{name}.{ref.name}": ref.get().detach().contiguous().clone()
                for ref in collect_tensor_refs(layer)}
    finally:
        refs_to_meta(collect_tensor_refs(layer))


def disk_source(folder: Path, files: Sequence[Path], model: nn.Module, names: Sequence[str], quantize: Sequence[str],
                work: torch.device) -> tuple[SafetensorsSource, list[str]]:
    """Where the disk layers ``names`` stream from: the model's files when they hold them as the engine does, else
    the cache (written now where it lacks them). Returns (source, load-report lines)."""
    source, why = direct_source(files, model, names)
    if source is not None:
        return source, [f"disk tier: {len(names)} decoder layers stream from {folder} as stored (INT8, no cache)"]
    root = cache_folder(folder)
    cache = LayerCache(root, source_identity(files), plan_identity(quantize))
    notes = []
    if cache.started_over:
        notes.append(f"disk tier: the cache {root} was made from other files or another plan; written anew")
    todo = cache.need([layer_index(n) for n in names])
    prefix = names[0].rsplit(".", 1)[0]
    if todo:
        log.info("headroom: writing the INT8 cache of %d decoder layers to %s (%s)", len(todo), root, why)
    for i in todo:
        cache.write_layer(i, fill_layer_from_files(model, f"{prefix}.{i}", files, work, folder))
    layer_files = cache.files([layer_index(n) for n in names])
    try:
        source = SafetensorsSource(layer_files)
    except ValueError as err:  # FormatError: a cache file that does not parse
        raise LoaderError(f"the INT8 cache in {root} is damaged ({err}); delete the folder and load again") from None
    if cache.written:
        size = sum((root / cache.layers[str(i)]["file"]).stat().st_size for i in cache.written)
        notes.append(f"disk tier: wrote the INT8 cache of {len(cache.written)} decoder layers ({size / GB:.2f} GB) to "
                     f"{root} (once; reused while the model files are unchanged)")
    else:
        notes.append(f"disk tier: {len(names)} decoder layers stream from the INT8 cache {root}")
    return source, notes


def remove_cache(folder: Path) -> bool:
    """Delete the cache of ``folder`` (tests, and a user who wants the space back); True when there was one."""
    try:
        root = cache_folder(folder)
    except LoaderError:
        return False
    if root.is_dir():
        shutil.rmtree(root)
        return True
    return False
