"""HunyuanImage-3 at its real sizes, on Tencent's own code: one MoE block and one decoder layer, five engines.

    python bench/hunyuan3_moe.py --tencent-code DIR --out OUT [--doc docs/PERFORMANCE.md]   (needs CUDA)
    python bench/hunyuan3_moe.py --render OUT/hunyuan3_moe.json --doc docs/PERFORMANCE.md

``DIR`` holds Tencent's ``hunyuan.py`` and ``configuration_hunyuan.py`` from the HunyuanImage-3.0 release (we do not
ship them). Only the decoder layer's classes are used; the sibling modules the file imports (VAE, ViT, pipeline,
tokenizer) are replaced by empty stand-ins, and names transformers 5 removed are put back for the import.
Random weights at the release's sizes: hidden 4096, 32 heads / 8 KV heads of 128, 64 experts top-8 of width 3072 +
one shared expert. Tokens: 4096 (1024x1024) and 16384 (2048x2048), one image, no text.

Rows (each timed as the median of 8 runs after a warm-up, CUDA events; extra VRAM = peak during a call minus what
was allocated before it):
- MoE block: Tencent's eager forward (dispatch mask) in bf16; ours (integrations/hunyuan3/moe.py) in bf16
  (``torch._grouped_mm``), in INT8 (grouped W8A8 kernel), and with bitsandbytes' LLM.int8 / NF4 experts (per-expert
  calls); Tencent's eager forward with bitsandbytes experts too (what the community loaders run today).
- the grouped expert GEMM alone: ours vs ``torch._grouped_mm`` on the same sorted rows (bench/grouped_moe_gemm.py);
- a whole decoder layer (attention + MoE): Tencent bf16 eager, bf16 with our MoE, our INT8 (attention projections,
  shared and routed experts INT8);
- a stand-in for the whole model: 4 real-size layers, 8 Euler steps of ``x += dt * layers(x)`` from the same noise,
  bf16 (our MoE) vs INT8: cosine and PSNR of the final latent.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import event_median_ms, import_package, versions, write_section

TITLE = "HunyuanImage-3 at real sizes (MoE block, decoder layer)"
SIZES = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, attention_head_dim=128, num_experts=64,
             moe_topk=8, moe_intermediate_size=3072, num_shared_expert=1)
STUBS = {
    "autoencoder_kl_3d": ["AutoencoderKLConv3D", "AutoencoderKLConv3D_Dist"],
    "hunyuan_image_3_pipeline": ["HunyuanImage3Text2ImagePipeline", "FlowMatchDiscreteScheduler"],
    "image_processor": ["HunyuanImage3ImageProcessor"],
    "siglip2": ["Siglip2VisionTransformer", "LightProjector"],
    "tokenizer_wrapper": ["TokenizerWrapper", "ImageInfo", "JointImageInfo"],
    "tokenization_hunyuan_image_3": ["HunyuanImage3TokenizerFast", "ImageInfo", "ImageTensor", "CondImage"],
    "system_prompt": ["get_system_prompt", "t2i_system_prompts"],
    "cache_utils": ["TaylorCacheContainer", "CacheWithFreqsContainer"],
}


def tencent_module(code_dir: Path):
    """Import Tencent's hunyuan.py as part of a throwaway package whose other modules are empty stand-ins."""
    pkg_dir = Path(tempfile.mkdtemp()) / "hy3_release"
    pkg_dir.mkdir()
    (pkg_dir / "__init__.py").write_text("")
    for name in ("hunyuan.py", "configuration_hunyuan.py"):
        (pkg_dir / name).write_text((code_dir / name).read_text())
    for module, names in STUBS.items():
        body = "".join(f"class {n}:\n    pass\n" if n[0].isupper() else f"def {n}(*a, **k):\n    return None\n"
                       for n in names)
        (pkg_dir / f"{module}.py").write_text(body + "t2i_system_prompts = {}\n")
    import transformers.generation.utils as gen_utils

    if not hasattr(gen_utils, "ALL_CACHE_NAMES"):  # gone in transformers 5: the release imports it
        gen_utils.ALL_CACHE_NAMES = ["past_key_values", "cache_params", "state", "mems", "past_buckets_states"]
    try:  # our own shims, when this checkout has them
        from comfyui_headroom.integrations.hunyuan3.compat import (
            prepare_transformers5_import,
        )

        prepare_transformers5_import()
    except ImportError:
        pass
    sys.path.insert(0, str(pkg_dir.parent))
    return importlib.import_module("hy3_release.hunyuan"), importlib.import_module("hy3_release.configuration_hunyuan")


def make_config(conf_module, layers: int = 1):
    config = conf_module.HunyuanImage3Config(num_hidden_layers=layers, vocab_size=1024, hidden_act="silu",
                                             use_qk_norm=True, use_rotary_pos_emb=True, rope_scaling={"type": "custom"},
                                             norm_type="hf_rms", moe_impl="eager", use_mixed_mlp_moe=True,
                                             attention_bias=False, mlp_bias=False, **SIZES)
    config._attn_implementation = "sdpa"
    return config


def init_small(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights of a trained model's scale (the default init makes activations explode over layers)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return module


def build(cls, *args, state=None, **kwargs):
    """A module of Tencent's code made on the GPU in bf16 (fast init; the router stays float32), optionally
    loaded with ``state``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            module = cls(*args, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    for sub in module.modules():
        if hasattr(sub, "wg"):
            sub.wg.float()
    if state is None:
        init_small(module)
    else:
        module.load_state_dict(state)
    return module


def timed(fn, repeats: int = 8) -> dict:
    """Median ms over ``repeats`` after a warm-up, and the extra peak VRAM of one call in GB."""
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = event_median_ms(fn, reps=repeats, warmup=0)
    return {"ms": ms, "extra_vram_gb": extra}


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _bnb_experts(moe, kind: str):
    """The MoE's expert and shared-expert Linears as bitsandbytes layers (quantized when moved to the GPU)."""
    import bitsandbytes as bnb

    def convert(linear):
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                        threshold=6.0)
            layer.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        return layer.cuda()

    for mlp in list(moe.experts) + [moe.shared_mlp]:
        mlp.gate_and_up_proj = convert(mlp.gate_and_up_proj)
        mlp.down_proj = convert(mlp.down_proj)
    return moe


def _holder(module):
    holder = torch.nn.Module()
    holder.mlp = module
    return holder


def _int8_linears(module, names):
    from comfyui_headroom.quant.linear import Int8Linear

    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, Int8Linear.from_linear(getattr(owner, child)))


def bench_moe(hy, config, tokens: int, results: dict, with_bnb: bool) -> None:
    from comfyui_headroom.integrations.hunyuan3.moe import replace_moe

    torch.manual_seed(0)
    x = torch.randn(1, tokens, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)
    tencent = build(hy.HunyuanMoE, config, layer_idx=0)
    state = {k: v.clone() for k, v in tencent.state_dict().items()}  # every engine starts from these weights
    rows = {}
    rows["Tencent eager bf16"] = timed(lambda: tencent(x))
    reference = tencent(x).float()
    for stack, label in (("bf16", "ours bf16 (sorted, torch._grouped_mm)"), ("int8", "ours INT8 (grouped W8A8)")):
        holder = _holder(tencent)
        replace_moe(holder, stack=stack)
        if stack == "int8":
            _int8_linears(holder.mlp, ["shared_mlp.gate_and_up_proj", "shared_mlp.down_proj"])
        rows[label] = timed(lambda: holder.mlp(x))
        out = holder.mlp(x).float()
        rows[label]["rel_err_vs_eager"] = ((out - reference).norm() / reference.norm()).item()
        del holder
        tencent = build(hy.HunyuanMoE, config, layer_idx=0, state=state)
        _free()
    tencent = None
    _free()
    if with_bnb:
        for kind in ("int8", "nf4"):
            for ours in (False, True):
                moe = _bnb_experts(build(hy.HunyuanMoE, config, layer_idx=0, state=state), kind)
                holder = _holder(moe)
                if ours:
                    replace_moe(holder, stack=None)
                label = f"{'ours' if ours else 'Tencent eager'} + bitsandbytes {kind.upper()} experts"
                try:
                    rows[label] = timed(lambda: holder.mlp(x), repeats=4)
                except Exception as err:  # noqa: BLE001 - recorded
                    rows[label] = {"error": f"{type(err).__name__}: {err}"[:300]}
                del holder, moe
                _free()
    results[f"moe_{tokens}"] = rows
    print(f"MoE block, {tokens} tokens:", json.dumps(rows, indent=1), flush=True)


def bench_layer(hy, config, tokens: int, results: dict) -> None:
    from comfyui_headroom.integrations.hunyuan3.moe import replace_moe

    torch.manual_seed(0)
    x = torch.randn(1, tokens, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(1, tokens, SIZES["attention_head_dim"], device="cuda", dtype=torch.bfloat16).cos()
    sin = (1 - cos.float() ** 2).sqrt().to(torch.bfloat16)
    layer = build(hy.HunyuanImage3DecoderLayer, config, layer_idx=0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    run = lambda: layer(x, custom_pos_emb=(cos, sin))[0]  # noqa: E731
    rows = {"Tencent eager bf16": timed(run)}
    reference = run().float()
    replace_moe(layer, stack="bf16")
    rows["bf16 + our MoE"] = timed(run)
    layer = None
    _free()
    layer = build(hy.HunyuanImage3DecoderLayer, config, layer_idx=0, state=state)
    replace_moe(layer, stack="int8")
    _int8_linears(layer, ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.shared_mlp.gate_and_up_proj",
                          "mlp.shared_mlp.down_proj"])
    rows["ours INT8 (attention + experts)"] = timed(run)
    out = run().float()
    rows["ours INT8 (attention + experts)"]["rel_err_vs_eager"] = ((out - reference).norm() / reference.norm()).item()
    layer = None
    _free()
    results[f"layer_{tokens}"] = rows
    print(f"decoder layer, {tokens} tokens:", json.dumps(rows, indent=1), flush=True)


def bench_stand_in(hy, conf_module, results: dict, layers: int = 4, steps: int = 8, tokens: int = 4096) -> None:
    """bf16 (our MoE) vs INT8 over several real-size layers and steps: how far the final latent drifts."""
    from comfyui_headroom.integrations.hunyuan3.moe import replace_moe

    config = make_config(conf_module, layers)
    torch.manual_seed(1)
    states = []
    for i in range(layers):
        block = build(hy.HunyuanImage3DecoderLayer, config, layer_idx=i)
        states.append({k: v.clone() for k, v in block.state_dict().items()})
        del block
    x0 = torch.randn(1, tokens, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(1, tokens, SIZES["attention_head_dim"], device="cuda", dtype=torch.bfloat16).cos()
    sin = (1 - cos.float() ** 2).sqrt().to(torch.bfloat16)

    def sample(model_blocks):
        x = x0.clone()
        with torch.inference_mode():
            for _ in range(steps):
                h = x
                for b in model_blocks:
                    h = b(h, custom_pos_emb=(cos, sin))[0]
                x = x + (1.0 / steps) * (h - x)
        return x.float()

    finals = {}
    for engine in ("bf16", "int8"):
        holder = torch.nn.ModuleList([build(hy.HunyuanImage3DecoderLayer, config, layer_idx=i, state=s)
                                      for i, s in enumerate(states)])
        replace_moe(holder, stack=engine)
        if engine == "int8":
            for b in holder:
                _int8_linears(b, ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.shared_mlp.gate_and_up_proj",
                                  "mlp.shared_mlp.down_proj"])
        finals[engine] = sample(list(holder))
        del holder
        _free()
    a, b = finals["bf16"], finals["int8"]
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    peak = a.abs().max().item()
    mse = ((a - b) ** 2).mean().item()
    results["stand_in"] = {"layers": layers, "steps": steps, "tokens": tokens, "cosine": cosine,
                           "psnr_db": 10 * torch.log10(torch.tensor(peak ** 2 / max(mse, 1e-30))).item()}
    print("stand-in:", results["stand_in"], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tencent-code", help="folder with the release's hunyuan.py and configuration_hunyuan.py")
    parser.add_argument("--out", default=".")
    parser.add_argument("--doc")
    parser.add_argument("--render")
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: moe,gemm,layer,stand_in,bnb")
    args = parser.parse_args(argv)
    if args.render:
        text = render(json.loads(Path(args.render).read_text()))
        if args.doc:
            write_section(TITLE, text, Path(args.doc))
        print(text)
        return 0
    if not torch.cuda.is_available() or not args.tencent_code:
        print("needs CUDA and --tencent-code")
        return 2
    import_package()
    skip = set(filter(None, args.skip.split(",")))
    hy, conf = tencent_module(Path(args.tencent_code))
    config = make_config(conf)
    results: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "versions": versions("triton", "transformers", "bitsandbytes"), "sizes": SIZES}
    try:
        import flashinfer  # noqa: F401

        results["flashinfer"] = "installed (not measured here)"
    except ImportError:
        results["flashinfer"] = "not installed on the device image (no wheel carried): its MoE is not measured"
    tokens = [int(t) for t in args.tokens.split(",")]
    for t in tokens:
        if "moe" not in skip:
            bench_moe(hy, config, t, results, with_bnb="bnb" not in skip and t == tokens[0])
        _free()
        if "gemm" not in skip:
            from grouped_moe_gemm import run as gemm_run

            results[f"gemm_{t}"] = gemm_run(rows_per_token_pairs=(t * SIZES["moe_topk"],))
        _free()
        if "layer" not in skip:
            bench_layer(hy, config, t, results)
        _free()
    if "stand_in" not in skip:
        bench_stand_in(hy, conf, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hunyuan3_moe.json").write_text(json.dumps(results, indent=2, default=str))
    text = render(results)
    (out / "hunyuan3_moe.md").write_text(text)
    print(text)
    if args.doc:
        write_section(TITLE, text, Path(args.doc))
    return 0


def _table(rows: dict, base: str) -> list[str]:
    lines = ["| engine | ms | x base | extra VRAM GB | rel. error vs eager |", "|---|---|---|---|---|"]
    ref = rows.get(base, {}).get("ms")
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:80]} | | | |")
            continue
        ratio = f"{ref / row['ms']:.2f}x" if ref else ""
        err = f"{row['rel_err_vs_eager']:.4f}" if "rel_err_vs_eager" in row else ""
        lines.append(f"| {name} | {row['ms']:.1f} | {ratio} | {row['extra_vram_gb']:.2f} | {err} |")
    return lines


def render(data: dict) -> str:
    v = data["versions"]
    lines = [f"GPU: {data['device']}; torch {v['torch']}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
             f"bitsandbytes {v.get('bitsandbytes')}; {data['date']}; command: `python bench/hunyuan3_moe.py "
             "--tencent-code DIR --out OUT` (one run, device tool; DIR = the release's hunyuan.py + "
             "configuration_hunyuan.py). Tencent's code at the release's sizes with random weights (std 0.02); "
             "\"x base\" = Tencent eager bf16 time / this row's time. FlashInfer: " + data.get("flashinfer", "?") + ".", ""]
    for key in sorted(k for k in data if k.startswith("moe_")):
        lines += [f"### One MoE block, {key[4:]} tokens", ""] + _table(data[key], "Tencent eager bf16") + [""]
        rows = data[key]
        ours, bf16 = rows.get("ours INT8 (grouped W8A8)", {}), rows.get("ours bf16 (sorted, torch._grouped_mm)", {})
        if "ms" in ours and "ms" in bf16:
            lines.append(f"- our INT8 MoE vs our bf16 MoE: **{bf16['ms'] / ours['ms']:.2f}x** (goal >= 1.4x); vs "
                         f"Tencent eager: {rows['Tencent eager bf16']['ms'] / ours['ms']:.2f}x (goal >= 3.5x at 1 MP)")
            for label, goal in (("Tencent eager + bitsandbytes INT8 experts", 15), ("Tencent eager + bitsandbytes NF4 experts", 6)):
                if "ms" in rows.get(label, {}):
                    lines.append(f"- vs {label}: {rows[label]['ms'] / ours['ms']:.1f}x (goal >= {goal}x at 1 MP)")
            eager_extra = rows["Tencent eager bf16"]["extra_vram_gb"]
            lines.append(f"- extra VRAM: ours INT8 {ours['extra_vram_gb']:.2f} GB vs eager {eager_extra:.2f} GB "
                         f"(1/{eager_extra / max(ours['extra_vram_gb'], 1e-9):.0f}; goal at 4 MP <= 1/20 and <= 1.4 GB)")
        lines.append("")
    for key in sorted(k for k in data if k.startswith("gemm_")):
        lines += [f"### Grouped expert GEMM alone, {key[5:]} tokens x top-8 (bench/grouped_moe_gemm.py)", "",
                  "| projection | INT8 grouped ms | bf16 torch._grouped_mm ms | bf16 loop ms | grouped_mm / INT8 |",
                  "|---|---|---|---|---|"]
        for run in data[key].get("runs", []):
            for shape, row in run["shapes"].items():
                lines.append(f"| {shape} [{row['n']}x{row['k']}] | {row['int8 grouped']:.2f} | "
                             f"{row['bf16 grouped_mm']:.2f} | {row['bf16 loop']:.2f} | **{row['speedup']:.2f}x** |")
            mlp = run.get("mlp_ms", {})
            if mlp:
                lines += ["", f"- expert MLP with its producers: INT8 {mlp['int8']:.2f} ms vs bf16 {mlp['bf16']:.2f} ms "
                          f"(**{mlp['speedup']:.2f}x**); tile {data[key].get('configs', {})}; goal per GEMM >= 1.5x"]
        lines.append("")
    for key in sorted(k for k in data if k.startswith("layer_")):
        rows = data[key]
        lines += [f"### One decoder layer (attention + MoE), {key[6:]} tokens", ""] + _table(rows, "Tencent eager bf16")
        if "ms" in rows.get("ours INT8 (attention + experts)", {}) and "ms" in rows.get("bf16 + our MoE", {}):
            lines.append("")
            lines.append(f"- our INT8 layer vs bf16 with our MoE: **{rows['bf16 + our MoE']['ms'] / rows['ours INT8 (attention + experts)']['ms']:.2f}x** (goal >= 1.4x)")
        lines.append("")
    if "stand_in" in data:
        s = data["stand_in"]
        lines += ["### Several layers and steps: INT8 vs bf16", "",
                  f"{s['layers']} real-size decoder layers, {s['steps']} Euler steps of x += dt (layers(x) - x) on "
                  f"{s['tokens']} tokens from the same noise (a stand-in for the whole model, whose VAE, ViT and "
                  f"tokenizer are not part of this bench): cosine of the final latent **{s['cosine']:.5f}** (goal >= "
                  f"0.99), PSNR {s['psnr_db']:.1f} dB.", ""]
    lines.extend(f"- {note}" for note in data.get("notes", []))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
