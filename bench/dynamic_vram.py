"""Our INT8 model beside ComfyUI's DynamicVRAM (comfy-aimdo), in the real ComfyUI server on a GPU (issue #18).

ComfyUI enables DynamicVRAM by default on NVIDIA; our loader hands ComfyUI a classic (non-dynamic) model patcher,
like ComfyUI-GGUF. This script starts the server with its default flags (DynamicVRAM on) and again with
``--disable-dynamic-vram``, and in each runs one prompt sequence through the HTTP API:

1. our INT8 loader (a random Flux of ``--hidden``, quantized on load) + ComfyUI's CLIP loader -> KSampler ->
   SaveLatent (+ VAEDecode when ``--vae`` names a VAE file in the server's models/vae), with Memory Report / GPU Info;
2. a second, larger model through ComfyUI's stock UNETLoader (bf16), same graph: ComfyUI must make room;
3. the first graph again: our model must come back;
4. the same graph with ComfyUI's stock loader on the first model (bf16) and, when comfy-kitchen is importable,
   with ComfyUI's own INT8 file of it: the anchors;
5. with ``--blocks-resident N``: ours with block streaming, the second model, ours again (the partial unload of a
   streaming model streams more of its blocks instead of unloading it).

Per prompt it records: ok / the error, wall seconds of the prompt (execution start -> success from the history),
VRAM free/total from ``/system_stats`` after the prompt, our nodes' status texts, and the lines of the server log
that mention out-of-memory, aimdo / dynamic VRAM, partial loading or tracebacks. ``--reserve-vram`` shrinks the
GPU ComfyUI sees, so the second model forces offloading on a large card.

    python bench/dynamic_vram.py --comfy /path/to/comfyui --out OUT [--hidden 3072 --big-depth 19 --reserve-vram 100]
    python bench/dynamic_vram.py --comfy DIR --out OUT --cpu --hidden 1024 --depth 1 --single 1 --big-depth 1 \
        --big-single 2 --side 64 --steps 2      # smoke test of the script without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOG_LINES = re.compile(r"out of memory|OutOfMemory|OOM|aimdo|dynamic|lowvram|partially|loaded partially|Traceback|"
                       r"Error|headroom: (partial unload|streaming|could not|no room)", re.I)


def write_models(folder: Path, args) -> dict:
    """Random bf16 Flux files (the model, a larger second one), CLIP-L and, with comfy-kitchen, ComfyUI's INT8 file,
    written once into ``folder``: ``{role: (models subfolder, file name)}``."""
    import torch
    from comfyui_models import clip_l_state_dict, flux_layout
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)

    def flux(name: str, depth: int, single: int, seed: int) -> tuple[str, str]:
        g = torch.Generator().manual_seed(seed)
        sd = {k: (torch.ones(s) if std is None else torch.randn(s, generator=g) * std).to(torch.bfloat16)
              for k, s, std in flux_layout(hidden=args.hidden, depth=depth, single=single, context=768)}
        save_file(sd, str(folder / name))
        return "diffusion_models", name

    files = {"model": flux("flux_a.safetensors", args.depth, args.single, 0),
             "big": flux("flux_big.safetensors", args.big_depth, args.big_single, 1)}
    save_file(clip_l_state_dict(), str(folder / "clip_l.safetensors"))
    files["clip"] = ("text_encoders", "clip_l.safetensors")
    try:
        sys.path.insert(0, str(HERE))
        from comfy_fused import kitchen_file  # comfy-kitchen's own INT8 layout
        from safetensors.torch import load_file

        kitchen_file(load_file(str(folder / files["model"][1])), str(folder / "flux_a_kitchen.safetensors"), "cuda")
        files["kitchen"] = ("diffusion_models", "flux_a_kitchen.safetensors")
    except Exception as err:  # comfy-kitchen not importable in this python, or no GPU
        print(f"ComfyUI INT8 anchor skipped: {type(err).__name__}: {err}", flush=True)
    return files


def link_models(base: Path, folder: Path, files: dict) -> None:
    for sub, name in files.values():
        target = base / "models" / sub / name
        if not target.exists():
            target.symlink_to(folder / name)


def graph(model_node: dict, side: int, steps: int, vae: str | None, ours: bool) -> dict:
    g = {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 0]}},
        "4": model_node,
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1, "steps": steps, "cfg": 1.0,
                                                 "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                                                 "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "dyn"}},
        "10": {"class_type": "HeadroomGpuInfo", "inputs": {"anything": ["6", 0]}},
    }
    if ours:
        g["8"] = {"class_type": "HeadroomMemoryReport", "inputs": {"model": ["4", 0], "anything": ["6", 0]}}
    if vae:
        g["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
        g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["11", 0]}}
        g["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    return g


def int8_loader(name: str, blocks_resident: int = 0) -> dict:
    return {"class_type": "HeadroomLoadDiffusionModelInt8", "inputs": {
        "unet_name": name, "weight_format": "auto", "quantize_on_load": True, "compute": "auto", "skip_patterns": "",
        "gpu_budget_gb": 0.0, "blocks_resident": blocks_resident}}


def stock_loader(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def run_prompt(server, name: str, prompt: dict, log_from: int) -> dict:
    start = time.perf_counter()
    row: dict = {"prompt": name}
    try:
        entry = server.run(prompt, timeout=1200)
        row["ok"] = True
        stamps = {m[0]: m[1].get("timestamp") for m in entry["status"].get("messages", [])}
        if stamps.get("execution_start") and stamps.get("execution_success"):
            row["exec_s"] = round((stamps["execution_success"] - stamps["execution_start"]) / 1000, 2)
        row["texts"] = {node: server.text_of(entry, node) for node in ("8", "10") if server.text_of(entry, node)}
    except Exception as err:  # the finding is what failed and how
        row["ok"] = False
        row["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
    row["wall_s"] = round(time.perf_counter() - start, 2)
    stats = server.get("/system_stats")
    row["vram"] = [{k: d.get(k) for k in ("name", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free")}
                   for d in stats.get("devices", [])]
    log = server.log_path.read_text(errors="replace")
    row["log"] = [line for line in log[log_from:].splitlines() if LOG_LINES.search(line)][-40:]
    row["_log_end"] = len(log)
    print(json.dumps({k: v for k, v in row.items() if k != "_log_end"})[:3000], flush=True)
    return row


def run_mode(args, dynamic: bool, folder: Path, files: dict) -> dict:
    from comfyui_server import ComfyServer

    base = Path(args.out) / ("dynamic_on" if dynamic else "dynamic_off")
    extra = [] if dynamic else ["--disable-dynamic-vram"]
    if args.reserve_vram:
        extra += ["--reserve-vram", str(args.reserve_vram)]
    server = ComfyServer(base, comfy_dir=args.comfy, python=args.python, extra_args=tuple(extra), cpu=args.cpu)
    link_models(base, folder, files)
    side = args.side
    server.start()
    rows, log_from = [], 0
    try:
        model, big = files["model"][1], files["big"][1]
        sequence = [("ours INT8", int8_loader(model), True),
                    ("second model, stock bf16", stock_loader(big), False),
                    ("ours INT8 again", int8_loader(model), True),
                    ("stock bf16", stock_loader(model), False)]
        if "kitchen" in files:
            sequence.append(("ComfyUI INT8 (comfy-kitchen)", stock_loader(files["kitchen"][1]), False))
        if args.blocks_resident:  # block streaming: the second model should shrink ours (more blocks streamed)
            streaming = int8_loader(model, args.blocks_resident)
            sequence += [("ours INT8 streaming", streaming, True),
                         ("second model, stock bf16", stock_loader(big), False),
                         ("ours INT8 streaming again", streaming, True)]
        for name, node, ours in sequence:
            row = run_prompt(server, name, graph(node, side, args.steps, args.vae, ours), log_from)
            log_from = row.pop("_log_end")
            rows.append(row)
        startup = [line for line in server.log_path.read_text(errors="replace").splitlines()[:80]
                   if re.search(r"aimdo|dynamic|VRAM|Device", line, re.I)]
    finally:
        server.stop()
    return {"flags": extra, "startup_log": startup, "prompts": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--python", default=sys.executable, help="ComfyUI's python (with comfy-aimdo installed)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--big-depth", type=int, default=19)
    ap.add_argument("--big-single", type=int, default=38)
    ap.add_argument("--side", type=int, default=1024, help="image side in pixels (1024: 4096 Flux tokens)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reserve-vram", type=float, default=0.0, help="GB ComfyUI leaves unused (shrinks the card)")
    ap.add_argument("--vae", default=None, help="a VAE file name in the server's models/vae (optional)")
    ap.add_argument("--blocks-resident", type=int, default=0,
                    help="also run our model with block streaming (this many blocks resident) before and after the "
                         "second model: partial unload streams more blocks instead of unloading it")
    ap.add_argument("--cpu", action="store_true", help="a smoke test of the script on a machine without a GPU")
    args = ap.parse_args()
    os.environ.setdefault("COMFYUI_DIR", args.comfy)
    result = {"command": "python bench/dynamic_vram.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "modes": {}}
    sys.path.insert(0, str(HERE.parent / "tests"))
    folder = Path(args.out) / "models"
    files = write_models(folder, args)
    for dynamic in (True, False):
        result["modes"]["dynamic_on" if dynamic else "dynamic_off"] = run_mode(args, dynamic, folder, files)
    with open(Path(args.out) / "dynamic_vram.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
