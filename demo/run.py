"""``headroom demo``: the whole product on a model the demo makes itself.

What a user does, end to end: a bf16 checkpoint on disk (created once in a cache folder) -> converted to
INT8 by the converter -> loaded under a VRAM budget (some blocks stream from pinned host memory) ->
sampled with flow matching -> decoded to a PNG; then the same sampling in bf16 as the reference, and a
report comparing the two (speed, cosine, PSNR) plus the MemoryTracker line.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..units import GB
from .model import SIZES, DemoConfig, DemoDiT, build_empty, make_state_dict
from .sampling import SampleResult, cosine_similarity, decode, initial_noise, psnr_db, sample, save_png

log = logging.getLogger("comfyui_headroom.demo")

CHECKPOINT_FORMAT = "1"  # bump when the model code changes what a seed produces
DEFAULT_STEPS = {"cuda": 8, "cpu": 4}  # a CPU run stays well under a minute on 2 cores
NOISE_SEED_OFFSET = 1000  # the latent noise is drawn from seed + this, the weights from seed


@dataclass
class DemoOptions:
    size: str | None = None  # tiny | small | 1b; default: small with a GPU, tiny without
    device: str | None = None  # cuda | cpu; default: cuda when available
    budget_gb: float | None = None  # VRAM for weights on a GPU; default: default_budget_bytes()
    steps: int | None = None  # default: 8 on a GPU, 4 on CPU
    seed: int = 0
    tokens: int | None = None  # default: the size's own (tiny 64, small 1024, 1b 4096)
    method: str = "rowwise"
    cache_dir: str | None = None
    out_dir: str | None = None
    cuda_graphs: bool = True  # on a GPU, blocks replay from CUDA graphs (memory/graphs.py); ignored on CPU
    ram_budget_gb: float | None = None  # RAM for streamed blocks: the INT8 blocks that do not fit are read from disk


def default_cache_dir() -> Path:
    """``$HEADROOM_CACHE/demo`` if set, else ``~/.cache/comfyui-headroom/demo``."""
    from ..memory.disk import cache_root

    return cache_root() / "demo"


# ----------------------------------------------------------------------------------------------- files

def checkpoint_metadata(cfg: DemoConfig, seed: int) -> dict[str, str]:
    shape = asdict(cfg)
    shape.pop("latent_size")  # the weights do not depend on the latent size
    return {"headroom_demo": json.dumps({"format": CHECKPOINT_FORMAT, "seed": seed, "config": shape}, sort_keys=True)}


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def ensure_checkpoint(size: str, cfg: DemoConfig, seed: int, folder: Path) -> tuple[Path, bool]:
    """The bf16 checkpoint for (size, seed): reused when present and matching, else created. -> (path, created)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dit-{size}-seed{seed}-bf16.safetensors"
    expected = checkpoint_metadata(cfg, seed)
    if path.exists():
        try:
            if _read_metadata(path).get("headroom_demo") == expected["headroom_demo"]:
                log.info("demo: reusing cached checkpoint %s", path)
                return path, False
            log.info("demo: %s was made by another demo version; rebuilding it", path)
        except Exception as err:  # a truncated file from an interrupted run
            log.info("demo: cached %s is unreadable (%s); rebuilding it", path, err)
    log.info("demo: creating %s (%.1f M parameters, seed %d)", path, cfg.parameter_count() / 1e6, seed)
    tensors = make_state_dict(cfg, seed)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=expected)
    os.replace(tmp, path)
    return path, True


def ensure_int8(src: Path, method: str, device: str = "cpu") -> tuple[Path, bool, dict]:
    """Convert ``src`` to INT8 next to it with the converter; reused while it was made from this ``src``.

    -> (path, created, info about the conversion).
    """
    from ..quant.convert import convert_file
    from ..quant.formats import META_METHOD, META_SOURCE_HASH
    from ..quant.safetensors_stream import raw_header_sha256

    dst = src.with_name(src.name.replace("-bf16.", f"-int8-{method}."))
    if dst.exists():
        try:
            meta = _read_metadata(dst)
        except Exception:  # unreadable: convert again
            meta = {}
        if meta.get(META_SOURCE_HASH) == raw_header_sha256(src) and meta.get(META_METHOD) == method:
            log.info("demo: reusing converted INT8 file %s", dst)
            return dst, False, {}
    report = convert_file(src, dst, method=method, device=device, progress=False, overwrite=True)
    log.info("demo: converted to %s in %.1f s (%d layers INT8, %d kept in float)",
             dst, report.seconds, len(report.quantized), len(report.kept))
    return dst, True, {"convert_time_s": report.seconds, "worst_layer_error": report.worst_error}


# ---------------------------------------------------------------------------------------------- models

def load_bf16_model(path: Path, cfg: DemoConfig, device) -> DemoDiT:
    model = build_empty(cfg)
    model.load_state_dict(load_file(str(path), device=str(device)), assign=True)
    return model.eval()


def load_int8_model(path: Path, cfg: DemoConfig, producers: bool = True,
                    lazy_blocks: bool = False) -> tuple[DemoDiT, int, int]:
    """Read a converted file into the demo model (on CPU). -> (model, INT8 layers, float Linears).

    Every Linear whose weight the file holds in INT8 (any layout :func:`parse_int8_layer` knows) becomes an
    :class:`Int8Linear` wrapping the file's tensors; everything else is assigned as it is. ``producers``: the
    blocks feed their INT8 layers from fused producers where a W8A8 kernel runs
    (:meth:`DemoDiT.use_int8_producers`). ``lazy_blocks``: the blocks' tensors are not read (meta device);
    the streamer reads them from the file (the disk tier), so the model never has to fit in RAM.
    """
    from ..quant import Int8Linear
    from ..quant.formats import parse_int8_layer

    if lazy_blocks:
        from ..quant.safetensors_stream import read_header

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("blocks.")}
        tensors.update({k: torch.empty(info.shape, dtype=info.dtype, device="meta")
                        for k, info in read_header(path).tensors.items() if k.startswith("blocks.")})
    else:
        tensors = load_file(str(path), device="cpu")
    metadata = _read_metadata(path)
    model = build_empty(cfg)
    int8_layers = float_layers = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parsed = parse_int8_layer(tensors, name + ".", metadata)
        if parsed is None:
            float_layers += 1
            continue
        layer = Int8Linear.from_quantized(parsed.weight, parsed.scale, tensors.pop(name + ".bias", None),
                                          block_size=parsed.block_size, compute_dtype=torch.bfloat16,
                                          rotation_group=parsed.rotation_group)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        int8_layers += 1
        for key in parsed.consumed_keys:  # now owned by the layer
            tensors.pop(key, None)
    unexpected = model.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: tensors the demo model does not have: {', '.join(unexpected[:5])}; "
                         "delete the file and run again")
    missing = [k for k, v in model.state_dict().items() if v.is_meta and not (lazy_blocks and k.startswith("blocks."))]
    if missing:
        raise ValueError(f"{path}: tensors missing for {', '.join(missing[:5])}; delete the file and run again")
    model.use_int8_producers(producers)
    return model.eval(), int8_layers, float_layers


# ------------------------------------------------------------------------------------------- placement

@dataclass
class Placement:
    blocks_resident: int
    blocks_streamed: int
    weights_vram_bytes: int  # resident weights + the streaming ring: what the weights take on the device
    ring_slots: int = 0
    tiers: dict | None = None  # blocks per tier: {"gpu": .., "ram": .., "disk": ..} ("gpu": on the compute device)
    streamer: object = None  # the BlockStreamer keeping the hooks alive, when blocks stream
    graphs: object = None  # the BlockGraphs of resident-only placements with cuda_graphs (a streamer owns its own)

    def copies(self) -> int:
        """Block copies host -> device so far (0 when nothing streams)."""
        return self.streamer.stats.copies if self.streamer is not None else 0

    def disk_read_gb_s(self) -> float | None:
        reader = self.streamer.disk_reader if self.streamer is not None else None
        return reader.stats.gb_per_s if reader is not None else None

    def release(self) -> None:
        if self.streamer is not None:
            self.streamer.disable(load_disk_blocks=False)  # the model is dropped next: no read-back
            self.streamer = None
        if self.graphs is not None:
            self.graphs.remove()
            self.graphs = None


def default_budget_bytes(model: DemoDiT) -> int:
    """The demo's default VRAM budget for weights on a GPU: everything outside the blocks + half the bytes of
    the blocks (in the model's own precision). The product's promise in one number: a model whose blocks need
    twice the budget still runs - the planner keeps what fits (the streaming ring included) and streams the rest."""
    from ..memory import module_bytes

    block_bytes = sum(module_bytes(b) for b in model.blocks)
    return module_bytes(model) - block_bytes + block_bytes // 2


def place(model: DemoDiT, device: torch.device, budget_bytes: int | None = None,
          blocks_resident: int | None = None, prefetch: int | None = None, cuda_graphs: bool = False,
          ram_budget_bytes: int | None = None, disk=None) -> Placement:
    """Move the model to ``device``. With a budget (bytes of VRAM for weights: the planner decides) or a
    number of resident blocks, the other blocks stream from pinned RAM through the memory package's streamer
    (its defaults: streamed blocks spread between resident ones, a ring of prefetch + 1 GPU slots). On a
    CPU device the same hooks run with plain copies (that is how the tests run them). ``cuda_graphs`` (CUDA
    only): every block replays from CUDA graphs, resident or streamed (:mod:`comfyui_headroom.memory.graphs`).
    ``ram_budget_bytes``: RAM for the streamed blocks; the others are read from ``disk`` (the model's file) on
    every step. On a CPU device every block then streams (the device is RAM itself)."""
    from ..memory import enable_block_streaming, module_bytes
    from ..memory.graphs import graph_blocks

    total = module_bytes(model)
    graphs = cuda_graphs and device.type == "cuda"

    def resident_only() -> Placement:
        model.to(device)
        return Placement(len(model.blocks), 0, total, tiers={"gpu": len(model.blocks), "ram": 0, "disk": 0},
                         graphs=graph_blocks(list(model.blocks)) if graphs else None)

    if ram_budget_bytes is not None and device.type == "cpu" and budget_bytes is None and blocks_resident is None:
        blocks_resident = 0
    if budget_bytes is None and blocks_resident is None:
        return resident_only()
    options = {} if prefetch is None else {"prefetch": prefetch}
    streamer = enable_block_streaming(model, device, blocks="blocks", budget_bytes=budget_bytes,
                                      blocks_resident=blocks_resident, cuda_graphs=graphs,
                                      ram_budget_bytes=ram_budget_bytes, disk=disk, **options)
    streamed = len(streamer.streamed_indices)
    if not streamed:  # everything fits: no hooks needed
        streamer.disable(device)
        return resident_only()
    vram = total - streamer.streamed_bytes + streamer.ring_bytes
    return Placement(len(model.blocks) - streamed, streamed, vram, min(streamer.prefetch + 1, streamed),
                     streamer.tier_counts(), streamer)


# --------------------------------------------------------------------------------------------- the run

def _most_used_kernel() -> tuple[str, dict]:
    from ..kernels import kernel_summary

    summary = kernel_summary()
    if not summary:
        return "none", summary
    return max(summary.items(), key=lambda kv: kv[1]["calls"])[0], summary


def resolve(options: DemoOptions) -> tuple[str, DemoConfig, torch.device]:
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    size = options.size or ("small" if device.type == "cuda" else "tiny")
    if size not in SIZES:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    if options.tokens:
        cfg = cfg.with_tokens(options.tokens)
    if options.steps is not None and options.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {options.steps}")
    return size, cfg, device


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Run:
    result: SampleResult
    placement: Placement
    budget_bytes: int | None
    load_s: float
    memory: object  # MemoryReport
    int8_producers: bool  # some block fed its INT8 layers from fused producers
    disk_read_gb_s: float | None = None  # the disk tier's read rate (None: nothing on disk)


def _run_one(load, device: torch.device, budget: int | None, noise, steps: int, warmup: bool,
             cuda_graphs: bool, ram_budget: int | None = None, disk=None) -> _Run:
    """Load (to CPU), place under the budget (on a GPU; default :func:`default_budget_bytes`), sample,
    clean up. On a CPU everything stays resident, unless a RAM budget streams the blocks (from RAM and ``disk``)."""
    from ..memory import MemoryTracker

    with MemoryTracker() as tracker:
        start = time.perf_counter()
        model = load()
        if device.type == "cuda" and budget is None:
            budget = default_budget_bytes(model)
        placement = place(model, device, budget if device.type == "cuda" else None, cuda_graphs=cuda_graphs,
                          ram_budget_bytes=ram_budget, disk=disk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load_s = time.perf_counter() - start
        result = sample(model, noise, steps, device, warmup=warmup)
    disk_rate = placement.disk_read_gb_s()
    placement.release()
    producers = any(block.producer_forwards for block in model.blocks)
    del model
    _free(device)
    return _Run(result, placement, budget if device.type == "cuda" else None, load_s, tracker.report,
                producers, disk_rate)


def run_demo(options: DemoOptions) -> dict:
    """Run the demo; returns the report (see :func:`format_report`)."""
    from ..kernels import reset_kernel_stats

    size, cfg, device = resolve(options)
    steps = options.steps or DEFAULT_STEPS.get(device.type, DEFAULT_STEPS["cpu"])
    warmup = True  # one untimed call first: GPU kernels compile/autotune, CPU caches and allocator settle
    folder = Path(options.cache_dir).expanduser() if options.cache_dir else default_cache_dir()
    out_dir = Path(options.out_dir).expanduser() if options.out_dir else folder  # never the current folder
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    checkpoint, created = ensure_checkpoint(size, cfg, options.seed, folder)
    create_s = time.perf_counter() - start
    int8_path, converted, convert_info = ensure_int8(checkpoint, options.method)  # CPU: same file everywhere
    noise = initial_noise(cfg.latent_channels, cfg.latent_size, options.seed + NOISE_SEED_OFFSET)

    # INT8 first, then bf16 under the same budget; each under its own tracker (peaks of that run alone).
    reset_kernel_stats()
    int8_layers = float_layers = 0

    def load_int8():
        nonlocal int8_layers, float_layers
        model, int8_layers, float_layers = load_int8_model(int8_path, cfg)
        return model

    budget = int(options.budget_gb * GB) if options.budget_gb is not None else None
    ram_budget = None
    if options.ram_budget_gb is not None:
        if not (options.ram_budget_gb >= 0 and math.isfinite(options.ram_budget_gb)):
            raise ValueError(f"--ram-budget-gb must be a number >= 0, got {options.ram_budget_gb}")
        ram_budget = int(options.ram_budget_gb * GB)
    resident_int8 = None
    if ram_budget is not None:  # the reference: the same INT8 model without a RAM budget (nothing on disk)
        resident_int8 = _run_one(load_int8, device, budget, noise, steps, warmup, options.cuda_graphs)

    def load_int8_from_disk():  # the blocks are read from the file by the streamer, never loaded whole
        nonlocal int8_layers, float_layers
        model, int8_layers, float_layers = load_int8_model(int8_path, cfg, lazy_blocks=True)
        return model

    int8 = _run_one(load_int8 if ram_budget is None else load_int8_from_disk, device, budget, noise, steps, warmup,
                    options.cuda_graphs, ram_budget, int8_path)
    kernel, kernel_calls = _most_used_kernel()
    # bf16 runs under the same budget: --budget-gb, or the one the INT8 run got (its blocks are twice as
    # large, so more of them stream; the planner raises a budget below its streaming ring, with a warning).
    bf16_budget = budget if budget is not None else int8.budget_bytes
    bf16 = _run_one(lambda: load_bf16_model(checkpoint, cfg, "cpu"), device, bf16_budget, noise, steps, warmup,
                    options.cuda_graphs)
    int8_run, bf16_run = int8.result, bf16.result

    image = decode(int8_run.latent)
    image_bf16 = decode(bf16_run.latent)
    image_path = out_dir / f"headroom-demo-{size}.png"
    image_bf16_path = out_dir / f"headroom-demo-{size}-bf16.png"
    save_png(image, image_path)
    save_png(image_bf16, image_bf16_path)
    psnr = psnr_db(image, image_bf16)

    return {
        "size": size,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "parameters": cfg.parameter_count(),
        "blocks": cfg.depth,
        "tokens": cfg.tokens,
        "steps": steps,
        "seed": options.seed,
        "checkpoint": str(checkpoint),
        "checkpoint_created": created,
        "create_time_s": create_s if created else 0.0,
        "int8_file": str(int8_path),
        "int8_converted": converted,
        "convert_time_s": convert_info.get("convert_time_s", 0.0),
        "method": options.method,
        "int8_layers": int8_layers,
        "float_linear_layers": float_layers,
        "kernel": kernel,
        "kernel_calls": {k: v["calls"] for k, v in kernel_calls.items()},
        "int8_producers": int8.int8_producers,
        "cuda_graphs": options.cuda_graphs and device.type == "cuda",
        "budget_gb": None if int8.budget_bytes is None else int8.budget_bytes / GB,
        "budget_default": options.budget_gb is None,
        "weights_vram_gb": int8.placement.weights_vram_bytes / GB,
        "weights_vram_bf16_gb": bf16.placement.weights_vram_bytes / GB,
        "blocks_resident": int8.placement.blocks_resident,
        "blocks_streamed": int8.placement.blocks_streamed,
        "blocks_resident_bf16": bf16.placement.blocks_resident,
        "blocks_streamed_bf16": bf16.placement.blocks_streamed,
        "ram_budget_gb": options.ram_budget_gb,
        "blocks_on_gpu": int8.placement.tiers["gpu"],
        "blocks_in_ram": int8.placement.tiers["ram"],
        "blocks_on_disk": int8.placement.tiers["disk"],
        "disk_read_gb_s": int8.disk_read_gb_s,
        "equal_to_resident": None if resident_int8 is None else
        bool(torch.equal(int8_run.latent, resident_int8.result.latent)),
        "load_time_s": int8.load_s,
        "load_time_bf16_s": bf16.load_s,
        "step_time_int8_s": int8_run.step_time_s,
        "step_time_bf16_s": bf16_run.step_time_s,
        "speedup": bf16_run.step_time_s / int8_run.step_time_s if int8_run.step_time_s else None,
        "cosine": cosine_similarity(int8_run.latent, bf16_run.latent),
        "psnr_db": psnr if math.isfinite(psnr) else None,  # None: the two images are identical
        "peak_vram_gb": (int8.memory.peak_vram_bytes or 0) / GB,
        "peak_ram_gb": int8.memory.peak_rss_bytes / GB,
        "memory": str(int8.memory),
        "peak_vram_bf16_gb": (bf16.memory.peak_vram_bytes or 0) / GB,
        "memory_bf16": str(bf16.memory),
        "image": str(image_path),
        "image_bf16": str(image_bf16_path),
        "image_size": [int(image.shape[1]), int(image.shape[0])],
    }


def format_report(r: dict) -> str:
    """The human-readable report ``headroom demo`` prints."""
    where = r["gpu"] or r["device"]
    made = f"created in {r['create_time_s']:.1f} s" if r["checkpoint_created"] else "cached"
    conv = f"converted in {r['convert_time_s']:.1f} s" if r["int8_converted"] else "cached"
    psnr = "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f} dB"
    speed = f" ({r['speedup']:.2f}x)" if r["speedup"] else ""
    if r["device"] == "cpu":  # the numbers are honest, but they do not say what INT8 is for
        speed += "; on a CPU INT8 runs the dequantize reference path, not meant to be faster"
    if r["device"] == "cpu":
        blocks = [f"  blocks     : {r['blocks_resident']} resident, {r['blocks_streamed']} streamed "
                  "(CPU: no VRAM budget)"]
    else:
        asked = "default: non-block weights + half the INT8 blocks" if r["budget_default"] else "--budget-gb"
        blocks = [
            f"  budget     : {r['budget_gb']:.2f} GB of VRAM for weights ({asked})",
            f"  blocks     : INT8 {r['blocks_resident']} resident + {r['blocks_streamed']} streamed "
            f"({r['weights_vram_gb']:.2f} GB) | bf16 {r['blocks_resident_bf16']} resident + "
            f"{r['blocks_streamed_bf16']} streamed ({r['weights_vram_bf16_gb']:.2f} GB)"
            + ("; both replayed from CUDA graphs" if r.get("cuda_graphs") else ""),
        ]
    if r.get("ram_budget_gb") is not None:
        rate = f", read at {r['disk_read_gb_s']:.2f} GB/s" if r.get("disk_read_gb_s") else ""
        blocks.append(f"  RAM budget : {r['ram_budget_gb']:.2f} GB - INT8 blocks {r['blocks_on_gpu']} on the device, "
                      f"{r['blocks_in_ram']} in RAM, {r['blocks_on_disk']} on disk{rate}; output "
                      f"{'bit for bit equal to' if r['equal_to_resident'] else 'DIFFERENT from'} the run without it")
    lines = [
        f"headroom demo: {r['size']} DiT, {r['parameters'] / 1e6:.0f} M parameters, {r['blocks']} blocks, "
        f"{r['tokens']} tokens, {r['steps']} steps on {where}",
        f"  checkpoint : {r['checkpoint']} ({made})",
        f"  INT8 file  : {r['int8_file']} ({conv}; {r['int8_layers']} Linear layers INT8 {r['method']}, "
        f"{r['float_linear_layers']} kept float)",
        f"  kernel     : {r['kernel']}" + (" (block inputs written in INT8 by fused producers)"
                                            if r.get("int8_producers") else ""),
        *blocks,
        f"  load time  : {r['load_time_s']:.2f} s INT8 | {r['load_time_bf16_s']:.2f} s bf16",
        f"  step time  : {r['step_time_int8_s'] * 1e3:.1f} ms INT8 | {r['step_time_bf16_s'] * 1e3:.1f} ms bf16{speed}",
        f"  INT8 vs bf16: cosine {r['cosine']:.6f}, PSNR {psnr}",
        f"  memory     : INT8 {r['memory']} | bf16 {r['memory_bf16']}",
        f"  image      : {r['image']} ({r['image_size'][0]}x{r['image_size'][1]}; bf16: {r['image_bf16']})",
        "               (random weights: the image is noise by design; what counts is that INT8 matches bf16)",
    ]
    return "\n".join(lines)
