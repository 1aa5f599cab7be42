"""Tiny synthetic checkpoints of real ComfyUI architectures (key names and shapes ComfyUI's detection expects).

No ComfyUI import: the tests that write these files run in the main venv, ComfyUI reads them in its own.

* :func:`flux_state_dict` - a Flux.1 (schnell-like: no guidance embedding) with ``depth`` double and
  ``single`` single blocks; ``hidden`` must be a multiple of 128 (ComfyUI derives heads = hidden / 128).
  With hidden >= 1024 the block linears are >= 1024 wide, so the INT8 loader really quantizes them.
* :func:`clip_l_state_dict` - an SD1 CLIP-L text encoder (ComfyUI builds it from a fixed config: 12
  layers, width 768), small random weights.
* :func:`flux_lora_state_dict` - a kohya-style LoRA for that Flux (``lora_unet_*`` keys).
"""

from __future__ import annotations

import torch


def _w(gen, *shape, std=0.02, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


def flux_layout(hidden=1024, depth=1, single=1, context=768, vec=768, in_channels=16):
    """``[(key, shape, std)]`` of a Flux.1 diffusion model in ComfyUI's key names (no data)."""
    if hidden % 128:
        raise ValueError("Flux hidden size must be a multiple of 128 (ComfyUI uses 128-wide heads)")
    out = []
    mlp = hidden * 4

    def linear(name, out_f, in_f, std=0.02):
        out.append((f"{name}.weight", (out_f, in_f), std))
        out.append((f"{name}.bias", (out_f,), 0.01))

    def norm(name):
        out.append((name, (128,), None))  # ones

    patch_in = in_channels * 4
    linear("img_in", hidden, patch_in, std=0.1)
    linear("time_in.in_layer", hidden, 256)
    linear("time_in.out_layer", hidden, hidden)
    linear("vector_in.in_layer", hidden, vec)
    linear("vector_in.out_layer", hidden, hidden)
    linear("txt_in", hidden, context, std=0.05)
    for i in range(depth):
        p = f"double_blocks.{i}"
        for side in ("img", "txt"):
            linear(f"{p}.{side}_mod.lin", 6 * hidden, hidden)
            linear(f"{p}.{side}_attn.qkv", 3 * hidden, hidden, std=0.03)
            norm(f"{p}.{side}_attn.norm.query_norm.weight")
            norm(f"{p}.{side}_attn.norm.key_norm.weight")
            linear(f"{p}.{side}_attn.proj", hidden, hidden, std=0.03)
            linear(f"{p}.{side}_mlp.0", mlp, hidden, std=0.03)
            linear(f"{p}.{side}_mlp.2", hidden, mlp, std=0.03)
    for i in range(single):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * hidden + mlp, hidden, std=0.03)
        linear(f"{p}.linear2", hidden, hidden + mlp, std=0.03)
        norm(f"{p}.norm.query_norm.weight")
        norm(f"{p}.norm.key_norm.weight")
        linear(f"{p}.modulation.lin", 3 * hidden, hidden)
    linear("final_layer.linear", patch_in, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return out


def flux_tensor(shape, std, gen, dtype=torch.bfloat16):
    if std is None:
        return torch.ones(*shape, dtype=dtype)
    return _w(gen, *shape, std=std, dtype=dtype)


def flux_state_dict(hidden=1024, depth=1, single=1, context=768, vec=768, in_channels=16, seed=0,
                    dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {key: flux_tensor(shape, std, gen, dtype)
            for key, shape, std in flux_layout(hidden, depth, single, context, vec, in_channels)}


def clip_l_state_dict(seed=1, dtype=torch.float16, layers=12, width=768, vocab=49408) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "text_model.embeddings.token_embedding.weight": _w(gen, vocab, width, dtype=dtype),
        "text_model.embeddings.position_embedding.weight": _w(gen, 77, width, std=0.01, dtype=dtype),
        "text_model.final_layer_norm.weight": torch.ones(width, dtype=dtype),
        "text_model.final_layer_norm.bias": torch.zeros(width, dtype=dtype),
        "text_projection.weight": _w(gen, width, width, dtype=dtype),
    }
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            sd[f"{p}.{norm}.weight"] = torch.ones(width, dtype=dtype)
            sd[f"{p}.{norm}.bias"] = torch.zeros(width, dtype=dtype)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}.self_attn.{proj}.weight"] = _w(gen, width, width, std=0.03, dtype=dtype)
            sd[f"{p}.self_attn.{proj}.bias"] = _w(gen, width, std=0.01, dtype=dtype)
        sd[f"{p}.mlp.fc1.weight"] = _w(gen, 4 * width, width, std=0.03, dtype=dtype)
        sd[f"{p}.mlp.fc1.bias"] = _w(gen, 4 * width, std=0.01, dtype=dtype)
        sd[f"{p}.mlp.fc2.weight"] = _w(gen, width, 4 * width, std=0.03, dtype=dtype)
        sd[f"{p}.mlp.fc2.bias"] = _w(gen, width, std=0.01, dtype=dtype)
    return sd


def flux_lora_state_dict(flux_sd: dict, rank=8, seed=2, std=0.05, alpha=None,
                         targets=("attn.qkv", "attn.proj", "mlp.0", "linear1", "linear2")) -> dict:
    """kohya-style LoRA (``lora_unet_<path_with_underscores>.lora_up/down.weight`` + ``.alpha``)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key, w in flux_sd.items():
        if not key.endswith(".weight") or w.ndim != 2 or not any(t in key for t in targets):
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        out_f, in_f = w.shape
        lora[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=gen) * std).to(torch.bfloat16)
        lora[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=gen) * std).to(torch.bfloat16)
        lora[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return lora
