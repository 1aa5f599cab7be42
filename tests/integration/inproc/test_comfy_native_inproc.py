"""The INT8 loader inside a real ComfyUI (in process, CPU): model, LoRA patches, partial loading, file formats.

Every comparison runs ComfyUI's own code on both sides: its stock loader (float, or comfy-kitchen INT8)
against ours, on a tiny Flux whose block linears are 1024+ wide so they really become INT8.
"""

import json

import comfy.lora
import comfy.model_management as mm
import comfy.sd
import pytest
import torch
from comfyui_headroom.integrations.comfyui.load import (
    load_int8_diffusion_model,
    load_int8_text_encoder,
)
from comfyui_headroom.integrations.comfyui.ops import Int8LoadConfig
from comfyui_headroom.quant.linear import int8_layers
from comfyui_headroom.quant.lora import UnsupportedPatchError
from comfyui_models import clip_l_state_dict, flux_lora_state_dict, flux_state_dict
from safetensors.torch import load_file, save_file
from testutil import outlier_weight


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def flux_sd():
    return flux_state_dict()


@pytest.fixture(scope="module")
def flux_file(workdir, flux_sd):
    path = workdir / "flux_tiny.safetensors"
    save_file(flux_sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(1, 16, 8, 8, generator=g), t=torch.tensor([0.7]),
                context=torch.randn(1, 12, 768, generator=g), y=torch.randn(1, 768, generator=g))


def run(patcher, inputs):
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.diffusion_model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"]).float()


@pytest.fixture(scope="module")
def stock(flux_file):
    return comfy.sd.load_diffusion_model(flux_file)


@pytest.fixture(scope="module")
def int8(flux_file):
    return load_int8_diffusion_model(flux_file, Int8LoadConfig())


def test_layers_really_int8_and_float_where_comfy_keeps_float(int8):
    patcher, record = int8
    names = {n.removeprefix("diffusion_model.") for n, _ in int8_layers(patcher.model)}
    assert len(names) == 10 and record.int8_layers == 10
    assert "double_blocks.0.img_attn.qkv" in names and "single_blocks.0.linear1" in names
    dm = patcher.model.diffusion_model
    for kept in ("img_in", "txt_in", "final_layer.linear", "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"):
        layer = dm.get_submodule(kept)
        assert layer.weight.dtype.is_floating_point, kept
    assert dm.double_blocks[0].img_attn.qkv.weight.dtype == torch.int8
    assert dm.double_blocks[0].img_attn.norm.key_norm.weight.dtype.is_floating_point
    assert type(patcher).__name__ == "Int8ModelPatcher"


def test_forward_matches_stock_float_within_int8_error(stock, int8, inputs):
    a, b = run(stock, inputs), run(int8[0], inputs)
    err = rel(b, a)
    assert 1e-5 < err < 0.02, err  # really quantized, and close


def test_stock_lora_loader_path_gives_side_branches(stock, int8, flux_file, inputs):
    lora = flux_lora_state_dict(load_file(flux_file), std=0.1)
    base_float, base_int8 = run(stock, inputs), run(int8[0], inputs)
    float_l, _ = comfy.sd.load_lora_for_models(stock, None, lora, 1.0, 0)  # what LoraLoader does
    int8_l, _ = comfy.sd.load_lora_for_models(int8[0], None, lora, 1.0, 0)
    weight_before = int8[0].model.diffusion_model.single_blocks[0].linear1.weight.clone()
    a, b = run(float_l, inputs), run(int8_l, inputs)
    layers = int8_layers(int8_l.model)
    assert sum(len(m.lora) for _, m in layers) == 8
    assert rel(a, base_float) > 5 * rel(b, a)  # the LoRA matters far more than the INT8 error
    assert rel(b, a) < 0.02
    assert torch.equal(int8_l.model.diffusion_model.single_blocks[0].linear1.weight, weight_before)  # never merged
    # strength change: a new clone, same modules, no re-quantization
    half, _ = comfy.sd.load_lora_for_models(int8[0], None, lora, 0.5, 0)
    c = run(half, inputs)
    float_half, _ = comfy.sd.load_lora_for_models(stock, None, lora, 0.5, 0)
    assert rel(c, run(float_half, inputs)) < 0.02 and rel(c, b) > 1e-3
    assert torch.equal(half.model.diffusion_model.single_blocks[0].linear1.weight, weight_before)
    # back to the plain model: branches dropped
    again = run(int8[0], inputs)
    assert all(not m.lora for _, m in layers) and torch.allclose(again, base_int8)


def test_partial_unload_takes_side_branches_off_the_gpu_with_their_weights(int8, flux_file, inputs):
    """When ComfyUI moves INT8 weights back to the CPU to make room (a dynamic model in the next prompt, say), their
    LoRA side branches leave the GPU too and count in the bytes freed; the output stays the same. No GPU here: the
    branches ComfyUI would have on the GPU are stood in for by meta tensors (any device but the CPU)."""
    from comfyui_headroom.integrations.comfyui.patcher import branch_bytes_off_cpu

    lora = flux_lora_state_dict(load_file(flux_file), std=0.1)
    patched, _ = comfy.sd.load_lora_for_models(int8[0], None, lora, 1.0, 0)
    expected = run(patched, inputs)  # loads (on the CPU): branches attached, on the CPU
    layers = {name: m for name, m in int8_layers(patched.model) if m.lora}
    assert layers and branch_bytes_off_cpu(layers) == 0
    on_cpu = {name: list(m.lora) for name, m in layers.items()}
    for m in layers.values():
        m.lora = [(down.to("meta"), up.to("meta"), scale) for down, up, scale in m.lora]
    off_cpu = branch_bytes_off_cpu(layers)
    assert off_cpu == sum(t.numel() * t.element_size() for branches in on_cpu.values()
                          for down, up, _ in branches for t in (down, up))
    freed = patched.partially_unload(torch.device("cpu"), memory_to_free=1)
    assert freed >= off_cpu and branch_bytes_off_cpu(layers) == 0
    assert patched.model_size() >= patched.loaded_size()  # ComfyUI's offloaded bytes stay >= 0
    for name, m in layers.items():
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
                   for a, b in zip(m.lora, on_cpu[name]))
    with torch.no_grad():
        again = patched.model.diffusion_model(inputs["x"], inputs["t"], context=inputs["context"],
                                              y=inputs["y"]).float()
    assert torch.equal(again, expected)


def test_diffusers_lora_with_offsets(stock, int8, inputs):
    # diffusers-style Flux LoRA on to_q of a single block: ComfyUI maps it to a row slice of linear1
    g = torch.Generator().manual_seed(5)
    lora = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 1024, generator=g) * 0.2,
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(1024, 4, generator=g) * 0.2}
    float_l, _ = comfy.sd.load_lora_for_models(stock, None, lora, 1.0, 0)
    int8_l, _ = comfy.sd.load_lora_for_models(int8[0], None, lora, 1.0, 0)
    a, b = run(float_l, inputs), run(int8_l, inputs)
    assert rel(a, run(stock, inputs)) > 5 * rel(b, a)
    assert rel(b, a) < 0.02


def test_unsupported_patch_fails_naming_loader_and_model_untouched(int8):
    patcher = int8[0]
    key = "diffusion_model.single_blocks.0.linear1.weight"
    clone = patcher.clone()
    with pytest.raises(UnsupportedPatchError, match="Load Diffusion Model \\(INT8\\)"):
        clone.add_patches({key: ("diff", (torch.zeros(7168, 1024),))}, 1.0)
    assert key not in clone.patches and not patcher.patches
    g = torch.Generator().manual_seed(1)
    bad = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, 512, generator=g),
           "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(7168, 4, generator=g)}
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with pytest.raises(UnsupportedPatchError, match="512"):
        patcher.clone().add_patches(comfy.lora.load_lora(bad, key_map, log_missing=False), 1.0)


def test_partial_loading_and_lowvram_bias_patch(int8, stock, inputs):
    patcher = int8[0]
    full = run(patcher, inputs)
    mm.unload_all_models()
    clone = patcher.clone()
    # a bias patch makes ComfyUI use its low-VRAM path (cast_bias_weight) on our INT8 layers
    bias_key = "diffusion_model.single_blocks.0.linear2.bias"
    delta = torch.full((1024,), 0.05)
    clone.add_patches({bias_key: ("diff", (delta,))}, 1.0)
    clone.load(torch.device("cpu"), lowvram_model_memory=8 * 2**20)  # far less than the model: partial
    assert clone.model.model_lowvram
    layer = clone.model.diffusion_model.single_blocks[0].linear2
    assert layer.bias_function, "ComfyUI should patch the bias on the fly"
    with torch.no_grad():
        out = clone.model.diffusion_model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"]).float()
    stock_clone = stock.clone()
    stock_clone.add_patches({bias_key: ("diff", (delta,))}, 1.0)
    ref = run(stock_clone, inputs)
    assert rel(out, ref) < 0.02 and rel(out, full) > 1e-4
    clone.unpatch_model(torch.device("cpu"))
    assert not layer.bias_function


def test_gpu_budget_caps_weights_on_device(flux_file, monkeypatch):
    import comfy.model_patcher

    patcher, _ = load_int8_diffusion_model(flux_file, Int8LoadConfig(), budget_bytes=16 * 2**20)
    calls = []
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load",
                        lambda self, device_to=None, lowvram_model_memory=0, force_patch_weights=False,
                        full_load=False: calls.append((device_to, lowvram_model_memory, full_load)))
    cuda = torch.device("cuda", 0)  # only recorded by the stub: no GPU needed
    patcher.load(cuda, lowvram_model_memory=0, full_load=True)  # ComfyUI: "it all fits"
    patcher.load(cuda, lowvram_model_memory=2**40)
    patcher.load(cuda, lowvram_model_memory=4 * 2**20)  # ComfyUI's own limit is lower: kept
    patcher.load(torch.device("cpu"), lowvram_model_memory=0, full_load=True)  # CPU: no budget
    assert calls == [(cuda, 16 * 2**20, False), (cuda, 16 * 2**20, False), (cuda, 4 * 2**20, False),
                     (torch.device("cpu"), 0, True)]


def _kitchen_file(src: dict, path, per_channel: bool, convrot: bool):
    """A ComfyUI int8_tensorwise checkpoint written with comfy-kitchen's own quantizer and state-dict layout."""
    from comfy_kitchen.tensor import QuantizedTensor

    out = {}
    for key, value in src.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and value.ndim == 2 and any(t in key for t in ("attn.qkv", "mlp.0", "linear1")):
            kwargs = {"per_channel": per_channel}
            if convrot:
                kwargs.update(convrot=True, convrot_groupsize=256)
            qt = QuantizedTensor.from_float(value, "TensorWiseINT8Layout", **kwargs)
            out.update(qt.state_dict(key))
            conf = {"format": "int8_tensorwise"}
            if convrot:
                conf.update(convrot=True, convrot_groupsize=256)
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        else:
            out[key] = value
    save_file(out, str(path))


@pytest.mark.parametrize("per_channel,convrot", [(False, False), (True, False), (True, True)])
def test_reads_comfy_kitchen_int8_files(workdir, flux_sd, stock, inputs, per_channel, convrot):
    path = workdir / f"kitchen_{int(per_channel)}{int(convrot)}.safetensors"
    _kitchen_file(flux_sd, path, per_channel, convrot)
    ours, record = load_int8_diffusion_model(str(path), Int8LoadConfig(quantize_on_load=False))
    assert len(record.from_file) == 5  # qkv x2, mlp.0 x2, linear1
    if convrot:
        assert all(v.endswith("+convrot") for v in record.from_file.values())
        assert ours.model.diffusion_model.single_blocks[0].linear1.rotation_group == 256
    reference = run(stock, inputs)
    theirs = run(comfy.sd.load_diffusion_model(str(path)), inputs)  # ComfyUI + comfy-kitchen on the same file
    mine = run(ours, inputs)
    assert rel(mine, reference) < 0.03
    assert rel(mine, theirs) < 0.02


def test_convrot_weight_is_not_used_as_plain(workdir, flux_sd, inputs, stock):
    """Dropping the rotation must be visible: the same file read as if plain is far off."""
    path = workdir / "kitchen_11.safetensors"
    if not path.exists():
        _kitchen_file(flux_sd, path, True, True)
    ours, _ = load_int8_diffusion_model(str(path), Int8LoadConfig(quantize_on_load=False))
    good = run(ours, inputs)
    for _, layer in int8_layers(ours.model):
        layer.rotation_group = 0
    try:
        wrong = run(ours, inputs)
    finally:
        for _, layer in int8_layers(ours.model):
            layer.rotation_group = 256
    reference = run(stock, inputs)
    assert rel(wrong, reference) > 10 * rel(good, reference)


def test_refuses_rotation_group_it_cannot_unrotate(workdir, flux_sd):
    src = dict(flux_sd)
    q = torch.zeros(7168, 1024, dtype=torch.int8)
    src["single_blocks.0.linear1.weight"] = q
    src["single_blocks.0.linear1.weight_scale"] = torch.ones(7168, 1)
    conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 48}
    src["single_blocks.0.linear1.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    path = workdir / "bad_convrot.safetensors"
    save_file(src, str(path))
    with pytest.raises(ValueError, match="single_blocks.0.linear1.*convrot"):
        load_int8_diffusion_model(str(path), Int8LoadConfig())


def test_stock_comfyui_loads_our_comfy_layout_conversion(workdir, flux_file, stock, inputs):
    from comfyui_headroom.quant.convert import convert_file

    out = workdir / "flux_int8_comfy.safetensors"
    convert_file(flux_file, out, method="rowwise", layout="comfy", progress=False, overwrite=True)
    theirs = comfy.sd.load_diffusion_model(str(out))
    qkv = theirs.model.diffusion_model.single_blocks[0].linear1.weight
    assert type(qkv).__name__ == "QuantizedTensor"
    assert rel(run(theirs, inputs), run(stock, inputs)) < 0.03
    ours, record = load_int8_diffusion_model(str(out), Int8LoadConfig(quantize_on_load=False))
    assert record.from_file and set(record.from_file.values()) == {"comfy"}


def test_rotation_on_load_stores_rotated_int8_and_helps_outlier_layers(workdir, flux_sd, inputs):
    """``rotation_group`` on load: every layer quantized while loading stores Q(W H), the forward rotates
    its input to match, and on a layer with outlier input channels the INT8 weight gets closer to the float."""
    src = dict(flux_sd)
    name = "single_blocks.0.linear1"
    w = src[name + ".weight"]
    src[name + ".weight"] = (outlier_weight(*w.shape, torch.Generator().manual_seed(3)) * w.float().std()).to(w.dtype)
    path = workdir / "flux_outliers.safetensors"
    save_file(src, str(path))
    reference = run(comfy.sd.load_diffusion_model(str(path)), inputs)
    plain, _ = load_int8_diffusion_model(str(path), Int8LoadConfig())
    rotated, record = load_int8_diffusion_model(str(path), Int8LoadConfig(rotation_group=128))
    assert len(record.rotated_on_load) == 10 and record.rotated_on_load == record.quantized_on_load
    assert "10 of them Hadamard-rotated" in record.summary()
    layer_p = plain.model.diffusion_model.get_submodule(name)
    layer_r = rotated.model.diffusion_model.get_submodule(name)
    assert (layer_p.rotation_group, layer_r.rotation_group) == (0, 128)
    original = src[name + ".weight"].float()
    err_plain, err_rotated = rel(layer_p.dequantized_weight(), original), rel(layer_r.dequantized_weight(), original)
    assert err_rotated < 0.7 * err_plain, (err_rotated, err_plain)
    good = run(rotated, inputs)
    assert rel(good, reference) < 0.03
    for _, layer in int8_layers(rotated.model):  # computing with the rotation dropped must be visibly wrong
        layer.rotation_group = 0
    assert rel(run(rotated, inputs), reference) > 10 * rel(good, reference)


def test_quantize_modulation_opt_in(flux_file, stock, inputs):
    from comfyui_headroom.integrations.comfyui.ops import native_skip_patterns

    patcher, record = load_int8_diffusion_model(flux_file, Int8LoadConfig(default_skips=native_skip_patterns(True)))
    dm = patcher.model.diffusion_model
    for name in ("double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "single_blocks.0.modulation.lin"):
        assert dm.get_submodule(name).weight.dtype == torch.int8, name
    for kept in ("img_in", "final_layer.linear", "time_in.out_layer"):  # the other defaults still hold
        assert dm.get_submodule(kept).weight.dtype.is_floating_point, kept
    assert record.int8_layers == 13
    assert rel(run(patcher, inputs), run(stock, inputs)) < 0.03


def test_rotation_group_is_checked():
    with pytest.raises(ValueError, match="group sizes"):
        Int8LoadConfig(rotation_group=100)


@pytest.mark.parametrize("fmt", ["block", "tensorwise"])
def test_weight_format_on_load(flux_file, stock, inputs, fmt):
    patcher, _ = load_int8_diffusion_model(flux_file, Int8LoadConfig(weight_format=fmt))
    layer = patcher.model.diffusion_model.single_blocks[0].linear1
    assert layer.method == fmt
    assert rel(run(patcher, inputs), run(stock, inputs)) < 0.03


def test_text_encoder_int8_matches_clip_loader(workdir):
    path = workdir / "clip_l.safetensors"
    save_file(clip_l_state_dict(), str(path))
    config = Int8LoadConfig(min_features=512)
    clip, record = load_int8_text_encoder([str(path)], comfy.sd.CLIPType.STABLE_DIFFUSION, config)
    assert record.int8_layers == 12 * 6
    te = clip.cond_stage_model
    assert te.clip_l.transformer.text_model.embeddings.token_embedding.weight.dtype.is_floating_point
    stock_clip = comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    tokens = stock_clip.tokenize("a red fox in the snow")
    a = stock_clip.encode_from_tokens(tokens)
    b = clip.encode_from_tokens(clip.tokenize("a red fox in the snow"))
    assert 1e-5 < rel(b, a) < 0.03


def test_block_streaming_mode_runs_like_resident(workdir, inputs):
    """blocks_resident > 0: headroom's streamer (exercised on the CPU here: synchronous copies)."""
    path = workdir / "flux_2x2.safetensors"
    save_file(flux_state_dict(depth=2, single=2, seed=3), str(path))
    resident, _ = load_int8_diffusion_model(str(path), Int8LoadConfig())
    patcher, _ = load_int8_diffusion_model(str(path), Int8LoadConfig(), blocks_resident=1)
    assert patcher.headroom_blocks_resident == 1 and patcher.clone().headroom_blocks_resident == 1
    patcher.load_streaming(torch.device("cpu"))
    dm = patcher.model.diffusion_model
    assert dm._headroom_streamer is not None and dm._headroom_streamer.streamed_bytes > 0
    with torch.no_grad():
        streamed = dm(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"]).float()
    patcher.unpatch_model(torch.device("cpu"))
    assert getattr(dm, "_headroom_streamer", None) is None
    assert torch.allclose(streamed, run(resident, inputs), atol=1e-5, rtol=1e-4)


def test_partial_unload_of_a_streaming_model_streams_more_blocks(workdir, inputs):
    """ComfyUI frees memory for another model by a partial unload: a streaming model streams more of its blocks
    from RAM instead of being unloaded whole (and pinned again on the next prompt); ComfyUI's accounting follows,
    and its next load (partially_load -> load) brings the blocks back."""
    path = workdir / "flux_3x3.safetensors"
    save_file(flux_state_dict(depth=3, single=3, seed=5), str(path))
    patcher, _ = load_int8_diffusion_model(str(path), Int8LoadConfig(), blocks_resident=5)
    patcher.load_streaming(torch.device("cpu"))
    dm = patcher.model.diffusion_model
    streamer = dm._headroom_streamer

    def forward():
        with torch.no_grad():
            return dm(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"]).float()

    expected = forward()
    loaded = patcher.loaded_size()
    assert patcher.partially_unload(torch.device("cpu"), 0) == 0
    assert patcher.partially_unload(torch.device("cpu"), patcher.model_size()) == 0  # cannot: all or nothing
    assert not streamer.demoted and patcher.loaded_size() == loaded
    want = max(streamer._block_bytes)  # one block's worth (the ring grows by a slot first)
    assert mm.LoadedModel(patcher).model_unload(want) is False  # ComfyUI's free_memory path: the model stays
    freed = loaded - patcher.loaded_size()
    assert freed >= want and streamer.demoted
    assert patcher.loaded_size() == loaded - freed and patcher.model.model_lowvram
    assert torch.equal(forward(), expected)
    patcher.load_streaming(torch.device("cpu"), loaded - freed + 1)  # no room for a block: nothing comes back
    assert streamer.demoted and patcher.model.model_lowvram
    patcher.load_streaming(torch.device("cpu"))
    assert not streamer.demoted and not patcher.model.model_lowvram and patcher.loaded_size() == loaded
    assert torch.equal(forward(), expected)
    patcher.unpatch_model(torch.device("cpu"))
    assert getattr(dm, "_headroom_streamer", None) is None


@pytest.mark.parametrize("budgets", [(), "plan"])
def test_devices_split_the_blocks_like_resident(workdir, inputs, budgets):
    """devices=(2 devices): ComfyUI's load splits the blocks over them (memory/multi_device.py), here over two CPU
    "devices" (same hooks and moves, no real copies; tests/test_multi_gpu.py and bench/multi_gpu.py run 2 GPUs)."""
    path = workdir / "flux_2x2_split.safetensors"
    save_file(flux_state_dict(depth=2, single=2, seed=4), str(path))
    resident, _ = load_int8_diffusion_model(str(path), Int8LoadConfig())
    device_budgets = ()
    if budgets == "plan":  # a tiny first budget: the planner puts one block there, the rest on the second
        dm = resident.model.diffusion_model
        first = sum(p.numel() * p.element_size() for p in dm.double_blocks[0].parameters())
        device_budgets = (first + sum(b.numel() * b.element_size() for b in dm.img_in.parameters()) * 4, 2**34)
    patcher, _ = load_int8_diffusion_model(str(path), Int8LoadConfig(), devices=("cpu", "cpu"),
                                           device_budgets=device_budgets)
    assert patcher.clone().headroom_devices == ("cpu", "cpu")
    patcher.load_split(torch.device("cpu"))
    dm = patcher.model.diffusion_model
    split = dm._headroom_multi_device
    assert split is not None and len(split.devices) == 2
    with torch.no_grad():
        out = dm(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"]).float()
    assert patcher.partially_unload(torch.device("cpu"), 1) == 0
    patcher.unpatch_model(torch.device("cpu"))
    assert getattr(dm, "_headroom_multi_device", None) is None
    assert torch.equal(out, run(resident, inputs))
    with pytest.raises(ValueError, match="takes its budgets from gpu_budgets_gb"):
        load_int8_diffusion_model(str(path), Int8LoadConfig(), blocks_resident=1, devices=("cpu", "cpu"))


def test_soft_unload_and_gpu_info_nodes(int8, inputs):
    from comfyui_headroom.nodes.memory_nodes import HeadroomGpuInfo, HeadroomSoftUnload

    patcher = int8[0]
    before = run(patcher, inputs)
    listed = HeadroomGpuInfo().info()["result"][0].count("Flux on cpu")
    assert listed >= 1
    result = HeadroomSoftUnload().park("passthrough", patcher)
    anything, status = result["result"]
    assert anything == "passthrough" and "parked" in status and status == result["ui"]["text"][0]
    assert not any(m.model is patcher for m in mm.current_loaded_models if m.model is not None)
    assert HeadroomGpuInfo().info()["result"][0].count("Flux on cpu") == listed - 1
    assert torch.allclose(run(patcher, inputs), before)  # brought back from the parked copy


def test_stacked_loras_each_get_a_branch(stock, int8, flux_file, inputs):
    sd = load_file(flux_file)
    first = flux_lora_state_dict(sd, std=0.08, seed=10)
    second = flux_lora_state_dict(sd, std=0.08, seed=11, targets=("linear1",))
    float_l, _ = comfy.sd.load_lora_for_models(stock, None, first, 1.0, 0)
    float_l, _ = comfy.sd.load_lora_for_models(float_l, None, second, -0.5, 0)
    int8_l, _ = comfy.sd.load_lora_for_models(int8[0], None, first, 1.0, 0)
    int8_l, _ = comfy.sd.load_lora_for_models(int8_l, None, second, -0.5, 0)
    b = run(int8_l, inputs)
    layer = int8_l.model.diffusion_model.single_blocks[0].linear1
    assert len(layer.lora) == 2 and layer.lora[1][2] == pytest.approx(-0.5)
    assert rel(b, run(float_l, inputs)) < 0.02


def test_compute_belongs_to_its_model(flux_file, inputs):
    """Two loads of one file with different ``compute``: each model's INT8 layers run their own kernel, whichever
    runs when and with no sampling wrapper around the call (it was process-wide while a run lasted). On a CPU the
    automatic choice is the reference; ``int_mm`` runs where ``torch._int_mm`` takes the shape."""
    from comfyui_headroom.kernels.dispatch import (
        forced_kernel,
        kernel_summary,
        reset_kernel_stats,
    )

    with pytest.raises(ValueError, match="compute must be one of"):
        Int8LoadConfig(compute="fastest")
    forced, _ = load_int8_diffusion_model(flux_file, Int8LoadConfig(compute="int_mm"))
    auto, _ = load_int8_diffusion_model(flux_file, Int8LoadConfig())
    kernels, outputs = {}, {}
    for name, patcher in (("int_mm", forced), ("auto", auto), ("int_mm again", forced)):
        reset_kernel_stats()
        outputs[name] = run(patcher, inputs)
        kernels[name] = set(kernel_summary())
    assert "int_mm" in kernels["int_mm"] and "int_mm" in kernels["int_mm again"], kernels
    assert kernels["auto"] == {"reference"}, kernels
    assert forced_kernel() is None  # nothing left forced for the process
    assert rel(outputs["int_mm"], outputs["auto"]) < 0.02  # same model, another kernel
