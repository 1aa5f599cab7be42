"""What this machine can run: GPUs, RAM, the disk's read speed and, for a model file or folder, the plan.

Why: a user with a 32 GB GPU and 60 GB of RAM (seed 003) should learn before loading whether a 54 GB model fits,
where its blocks will live and how fast a step can be at best - not from an OOM half an hour later.

* The model is read from its safetensors headers only (``read_header``): its tensors become meta tensors of a
  module tree whose numbered children are block lists, so :func:`.planner.plan_placement` plans it exactly as it
  plans a loaded model, without a byte of weight in RAM.
* The disk test reads at most ``read_test_bytes`` of the model's largest file after dropping those pages from the
  page cache (``posix_fadvise``), so it measures the disk, not RAM.
* Step-time bound: a step moves every streamed block over PCIe and reads every disk block, so it cannot be faster
  than max(disk bytes / disk rate, streamed bytes / PCIe rate) - what the planner's spread order aims to reach.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..quant.safetensors_stream import FormatError, read_header
from ..units import GB, MB
from .planner import PlanError, default_budget_bytes, default_ram_budget_bytes, plan_placement

READ_TEST_BYTES = 256 * MB
PCIE_TEST_BYTES = 256 * MB


class DoctorError(ValueError):
    """The model path cannot be examined (the message names it and says what to give instead)."""


def model_files(path) -> list[Path]:
    """The safetensors files of a model file or folder (a folder: every ``*.safetensors`` in it, sorted)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DoctorError(f"{path} does not exist; give a model's .safetensors file or the folder holding its shards")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise DoctorError(f"{path} holds no .safetensors file; give a model's .safetensors file or its folder")
    return files


def header_model(files: list[Path]) -> nn.Module:
    """A module tree of meta tensors with the files' names, dtypes and shapes (numbered children form a
    ``ModuleList``, so the planner finds the block lists as in the real model)."""
    tree: dict = {}
    for file in files:
        try:
            header = read_header(file)
        except FormatError as err:
            raise DoctorError(str(err)) from None
        for key, info in header.tensors.items():
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise DoctorError(f"{file}: tensor '{key}' sits below another tensor's name; not a model layout")
            node.setdefault("", {})[leaf] = torch.empty(info.shape, dtype=info.dtype, device="meta")

    def build(node: dict) -> nn.Module:
        children = {k: v for k, v in node.items() if k != ""}
        if children and all(k.isdigit() for k in children):
            module: nn.Module = nn.ModuleList(build(children[k]) for k in sorted(children, key=int))
        else:
            module = nn.Module()
            for name, child in children.items():
                module.add_module(name, build(child))
        for name, tensor in node.get("", {}).items():
            module.register_buffer(name, tensor)
        return module

    return build(tree)


def disk_read_speed(path, read_test_bytes: int = READ_TEST_BYTES) -> dict:
    """Read at most ``read_test_bytes`` of ``path`` (the largest safetensors file of a folder) cold; -> GB/s."""
    path = Path(path)
    target = max(model_files(path), key=lambda f: f.stat().st_size) if path.is_dir() else path
    size = min(target.stat().st_size, read_test_bytes)
    chunk = bytearray(16 * MB)
    fd = os.open(target, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        start, done = time.perf_counter(), 0
        while done < size:
            n = os.preadv(fd, [memoryview(chunk)[: min(len(chunk), size - done)]], done)
            if n <= 0:
                break
            done += n
        seconds = time.perf_counter() - start
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"file": str(target), "bytes": done, "seconds": seconds,
            "gb_per_s": done / GB / seconds if seconds > 0 and done else None}


def pinned_h2d_speed(nbytes: int = PCIE_TEST_BYTES) -> float | None:
    """Pinned host -> GPU copy rate (GB/s) of cuda:0; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / GB / (time.perf_counter() - start)


def machine() -> dict:
    """GPUs (name, free and total VRAM) and RAM (available and total)."""
    import psutil

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "free_bytes": free,
                         "total_bytes": total})
    vm = psutil.virtual_memory()
    return {"gpus": gpus, "ram_total_bytes": vm.total, "ram_available_bytes": vm.available}


@dataclass
class Budgets:
    gpu_bytes: int
    ram_bytes: int
    gpu_default: bool
    ram_default: bool


def budgets_for(facts: dict, gpu_budget_bytes: int | None, ram_budget_bytes: int | None) -> Budgets:
    """The given budgets, or the defaults: 55 % of cuda:0's VRAM (0 without a GPU: every block streams) and
    what the RAM can spare (:func:`.planner.default_ram_budget_bytes`)."""
    gpu = gpu_budget_bytes
    if gpu is None:
        gpu = default_budget_bytes(facts["gpus"][0]["total_bytes"]) if facts["gpus"] else 0
    ram = ram_budget_bytes
    if ram is None:
        ram = default_ram_budget_bytes(facts["ram_available_bytes"], facts["ram_total_bytes"])
    return Budgets(int(gpu), int(ram), gpu_budget_bytes is None, ram_budget_bytes is None)


def plan_model(model: nn.Module, budgets: Budgets, facts: dict, disk_gb_s: float | None,
               pcie_gb_s: float | None) -> dict:
    """The plan under ``budgets`` as data: blocks per tier, bytes, RAM, the step-time bound, fits or why not."""
    total = facts["gpus"][0]["total_bytes"] if facts["gpus"] else None
    try:
        plan = plan_placement(model, budgets.gpu_bytes, device_totals=total, ram_budget_bytes=budgets.ram_bytes,
                              devices=["cuda:0"] if facts["gpus"] else ["cpu"])
    except (PlanError, ValueError) as err:
        return {"gpu_budget_bytes": budgets.gpu_bytes, "ram_budget_bytes": budgets.ram_bytes, "fits": False,
                "error": str(err)}
    bounds = {}
    if plan.disk_bytes:
        bounds["disk_s"] = plan.disk_bytes / GB / disk_gb_s if disk_gb_s else None
    if plan.streamed_bytes and pcie_gb_s:
        bounds["pcie_s"] = plan.streamed_bytes / GB / pcie_gb_s
    known = [v for v in bounds.values() if v is not None]
    return {
        "gpu_budget_bytes": plan.devices[0].budget_bytes, "ram_budget_bytes": budgets.ram_bytes,
        "gpu_default": budgets.gpu_default, "ram_default": budgets.ram_default,
        "fits": True, "error": None,
        "blocks": len(plan.block_names), "blocks_on_gpu": plan.tier_counts()["gpu"],
        "blocks_in_ram": plan.tier_counts()["ram"], "blocks_on_disk": plan.tier_counts()["disk"],
        "gpu_bytes": plan.devices[0].bytes, "ram_bytes": plan.ram_bytes,
        "pcie_bytes_per_step": plan.streamed_bytes, "disk_bytes_per_step": plan.disk_bytes,
        "step_bound_s": max(known) if known else 0.0 if not plan.streamed_bytes else None,
        "bounds_s": bounds, "warnings": list(plan.warnings), "text": str(plan),
    }


def diagnose(model_path=None, gpu_budget_bytes: int | None = None, ram_budget_bytes: int | None = None,
             read_test_bytes: int = READ_TEST_BYTES, measure_pcie: bool = True) -> dict:
    """Everything ``headroom doctor`` reports, as data (see the module docstring). ``model_path``: a
    safetensors file or a folder of them (None: the machine only). DoctorError for a path that is not a model."""
    facts = machine()
    report: dict = {"machine": facts, "model": None, "disk": None, "pcie_gb_s": None, "plans": []}
    if model_path is None:
        return report
    files = model_files(model_path)
    model = header_model(files)
    report["model"] = {"path": str(Path(model_path).expanduser()), "files": [str(f) for f in files],
                       "bytes": sum(f.stat().st_size for f in files)}
    report["disk"] = disk_read_speed(model_path, read_test_bytes)
    report["pcie_gb_s"] = pinned_h2d_speed() if measure_pcie else None
    disk_rate = report["disk"]["gb_per_s"]
    default = budgets_for(facts, None, None)
    plans = [("default", default)]
    if gpu_budget_bytes is not None or ram_budget_bytes is not None:
        plans.append(("given", budgets_for(facts, gpu_budget_bytes, ram_budget_bytes)))
    for name, budgets in plans:
        entry = plan_model(model, budgets, facts, disk_rate, report["pcie_gb_s"])
        entry["name"] = name
        report["plans"].append(entry)
    return report


def _gb(n) -> str:
    return "n/a" if n is None else f"{n / GB:.2f} GB"


def plan_lines(entry: dict) -> list[str]:
    """A plan entry of :func:`diagnose` in a few lines (also what an OOM message shows)."""
    head = (f"{entry['name']} budgets: GPU {_gb(entry['gpu_budget_bytes'])}"
            f"{' (default)' if entry.get('gpu_default') else ''}, RAM {_gb(entry['ram_budget_bytes'])}"
            f"{' (what this machine can spare)' if entry.get('ram_default') else ''}")
    if not entry["fits"]:
        return [head, f"  does not fit: {entry['error']}"]
    bound = entry["step_bound_s"]
    bound_text = "none (everything resident)" if bound == 0.0 else "unknown (no rate measured)" if bound is None \
        else f"{bound:.2f} s per step (disk {_gb(entry['disk_bytes_per_step'])}, PCIe " \
             f"{_gb(entry['pcie_bytes_per_step'])} per step)"
    lines = [head,
             f"  blocks: {entry['blocks_on_gpu']} on the GPU, {entry['blocks_in_ram']} in RAM, "
             f"{entry['blocks_on_disk']} on disk (of {entry['blocks']}); GPU {_gb(entry['gpu_bytes'])}, "
             f"RAM {_gb(entry['ram_bytes'])}",
             f"  step-time bound: {bound_text}"]
    lines += [f"  warning: {w}" for w in entry["warnings"]]
    return lines


def format_report(report: dict) -> str:
    """The human-readable ``headroom doctor`` output."""
    facts = report["machine"]
    lines = [f"{g['device']} {g['name']}: {_gb(g['free_bytes'])} free of {_gb(g['total_bytes'])}" for g in facts["gpus"]]
    if not facts["gpus"]:
        lines.append("no CUDA GPU visible: blocks would run on the CPU (the plan uses a GPU budget of 0 unless given)")
    lines.append(f"RAM: {_gb(facts['ram_available_bytes'])} available of {_gb(facts['ram_total_bytes'])}")
    if report["pcie_gb_s"]:
        lines.append(f"pinned host -> GPU: {report['pcie_gb_s']:.1f} GB/s")
    if report["model"] is None:
        lines.append("give a model file or folder to see where its blocks would live")
        return "\n".join(lines)
    disk = report["disk"]
    rate = f"{disk['gb_per_s']:.2f} GB/s" if disk["gb_per_s"] else "n/a"
    lines.append(f"disk: {rate} (read {disk['bytes'] / MB:.0f} MB of {disk['file']} with its pages dropped from "
                 "the page cache)")
    lines.append(f"model: {report['model']['path']} ({len(report['model']['files'])} files, "
                 f"{_gb(report['model']['bytes'])})")
    for entry in report["plans"]:
        lines += plan_lines(entry)
    return "\n".join(lines)


def oom_advice(model_path, gpu_budget_bytes: int | None = None, ram_budget_bytes: int | None = None) -> str:
    """Text to append to an out-of-memory error: the plan for this model under the budgets in use and the
    default ones, and what to change. Never raises (an OOM message must not turn into another error)."""
    try:
        report = diagnose(model_path, gpu_budget_bytes, ram_budget_bytes, read_test_bytes=16 * MB,
                          measure_pcie=False)
        lines = [f"placement plan for {model_path}:"] + [line for entry in report["plans"] for line in plan_lines(entry)]
    except Exception as err:  # noqa: BLE001 - advice is best effort
        return f"(headroom doctor could not plan {model_path}: {err})"
    lines.append("what to change: a lower GPU budget leaves more VRAM for activations (more blocks stream); a lower "
                 "RAM budget puts more blocks on disk; a smaller image or batch needs fewer activations; "
                 "`headroom doctor MODEL --gpu-budget-gb X --ram-budget-gb Y` shows the plan for other budgets")
    return "\n".join(lines)
