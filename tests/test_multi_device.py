"""enable_multi_device: a model split across devices runs like the unsplit one (CPU stands in for the GPUs).

Devices are given as "cpu" twice: placement, hooks and input moves run exactly as on two GPUs; what cannot
be checked here (real cross-device copies, speed) is listed in docs/multi_gpu.md.
"""

import pytest
import torch
import torch.nn.functional as F
from comfyui_headroom.memory import (
    PlanError,
    disable_multi_device,
    enable_block_streaming,
    enable_multi_device,
    module_bytes,
    multi_device,
    plan_placement,
)
from test_memory_models import TinyCausalLM, make_dit
from torch import nn

CPU2 = [torch.device("cpu"), torch.device("cpu")]


class CondBlock(nn.Module):
    """A DiT block that needs the timestep embedding and conditioning: (x, temb, context=..., extras={...})."""

    def __init__(self, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.attn_q = nn.Linear(hidden, hidden)
        self.attn_kv = nn.Linear(hidden, 2 * hidden)
        self.mlp = nn.Linear(hidden, hidden)

    def forward(self, x, temb, context=None, extras=None):
        shift, scale = self.mod(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        k, v = self.attn_kv(context).chunk(2, dim=-1)
        h = h + F.scaled_dot_product_attention(self.attn_q(h), k, v)
        cos, sin = extras["rope"]  # nested: dict -> tuple of tensors
        h = h * cos + sin + extras["bias"][0]
        return x + self.mlp(h)


class CondFinal(nn.Module):
    def __init__(self, hidden=32, out=8):
        super().__init__()
        self.mod = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, x, temb):
        return self.out(x + self.mod(temb).unsqueeze(1))


class CondDiT(nn.Module):
    def __init__(self, depth=6, hidden=32, in_ch=8):
        super().__init__()
        self.x_embed = nn.Linear(in_ch, hidden)
        self.t_embed = nn.Linear(1, hidden)
        self.ctx_embed = nn.Linear(12, hidden)
        self.blocks = nn.ModuleList(CondBlock(hidden) for _ in range(depth))
        self.final_layer = CondFinal(hidden, in_ch)
        self.register_buffer("freqs", torch.linspace(0.1, 1.0, hidden))

    def forward(self, x, t, context):
        h = self.x_embed(x)
        temb = self.t_embed(t.view(-1, 1))
        ctx = self.ctx_embed(context)
        pos = torch.arange(h.shape[1], dtype=h.dtype).view(-1, 1) * self.freqs
        extras = {"rope": (pos.cos(), pos.sin() * 0.1), "bias": [temb.unsqueeze(1) * 0.01]}
        for block in self.blocks:
            h = block(h, temb, context=ctx, extras=extras)
        return self.final_layer(h, temb)


def _dit(seed=0):
    torch.manual_seed(seed)
    return CondDiT().eval()


def _dit_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 10, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 12, generator=g)


@torch.no_grad()
def test_split_dit_with_kwargs_and_nested_inputs_is_bitwise_equal():
    model = _dit()
    inputs = _dit_inputs()
    expected = model(*inputs)
    split = enable_multi_device(model, CPU2)
    assert split.blocks_on(0) == [f"blocks.{i}" for i in range(3)]
    assert split.blocks_on(1) == [f"blocks.{i}" for i in range(3, 6)]
    assert split.slot_of("x_embed") == 0 and split.slot_of("final_layer") == 1
    got = model(*inputs)
    assert torch.equal(got, expected)
    assert split.stats.calls == 6 + 4  # every block + x_embed, t_embed, ctx_embed, final_layer
    split.disable()
    assert split.stats.calls == 10 and torch.equal(model(*inputs), expected)
    assert not hasattr(model, multi_device._ATTR)


@torch.no_grad()
def test_hooks_move_every_tensor_input_to_the_blocks_device(monkeypatch):
    model = _dit()
    split = enable_multi_device(model, CPU2)
    moves = []
    real = multi_device.to_device

    def spy(tensor, device, non_blocking):
        moves.append((tensor.shape, device, non_blocking))
        return real(tensor, device, non_blocking)

    monkeypatch.setattr(multi_device, "to_device", spy)
    x, t, ctx = _dit_inputs()
    model(x, t, ctx)
    # one block call moves x, temb, context, cos, sin, bias: 6 tensors (positional, kwargs, dict>tuple, dict>list)
    block_moves = 6 * 6
    head_moves = 3  # x_embed(x), t_embed(t), ctx_embed(context)
    final_moves = 2  # final_layer(h, temb)
    output_moves = 1  # model output to the first device
    assert len(moves) == block_moves + head_moves + final_moves + output_moves
    assert all(nb is True for _, _, nb in moves)
    assert all(dev == torch.device("cpu") for _, dev, _ in moves)
    assert sum(1 for shape, _, _ in moves if shape == (10, 32)) == 2 * 6  # rope cos/sin reached every block
    split.disable()
    moves.clear()
    model(x, t, ctx)
    assert moves == []  # hooks are gone after disable


@torch.no_grad()
def test_split_follows_a_plan_from_per_device_budgets():
    model = _dit()
    inputs = _dit_inputs()
    expected = model(*inputs)
    block = module_bytes(model.blocks[0])
    head = sum(module_bytes(getattr(model, n)) for n in ("x_embed", "t_embed", "ctx_embed")) + model.freqs.nbytes
    plan = plan_placement(model, [head + 2 * block, 10 ** 9], devices=["cpu", "cpu"])
    split = enable_multi_device(model, plan)
    assert split.blocks_on(0) == ["blocks.0", "blocks.1"]
    assert split.blocks_on(1) == [f"blocks.{i}" for i in range(2, 6)]
    assert split.slot_of("(root)") == 0  # the model's own buffer goes with the head
    assert torch.equal(model(*inputs), expected)
    split.disable()


@torch.no_grad()
def test_split_causal_lm_model_layers_bitwise_equal():
    torch.manual_seed(0)
    model = TinyCausalLM(depth=4).eval()
    ids = torch.randint(0, 97, (2, 7))
    expected = model(ids)
    split = enable_multi_device(model, ["cpu", "cpu"], blocks="model.layers")
    assert split.blocks_on(0) == ["model.layers.0", "model.layers.1"]
    assert split.slot_of("model.wte") == 0 and split.slot_of("lm_head") == 1 and split.slot_of("model.ln_f") == 1
    assert torch.equal(model(ids), expected)
    disable_multi_device(model)


@torch.no_grad()
def test_split_transformers_llama_bitwise_equal():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # padding: the mask is a real tensor kwarg of every layer
    expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    split = enable_multi_device(model, CPU2, blocks="model.layers")
    assert split.blocks_on(1) == ["model.layers.2", "model.layers.3"]
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert type(out).__name__ == "CausalLMOutputWithPast"  # output moved, type kept
    assert torch.equal(out.logits, expected)
    split.disable()


def test_move_to_keeps_structure():
    Pair = __import__("collections").namedtuple("Pair", "a b")
    value = {"x": [torch.ones(1), (torch.zeros(2), "tag")], "p": Pair(torch.ones(3), 5), "n": None}
    out = multi_device.move_to(value, torch.device("cpu"))
    assert isinstance(out["p"], Pair) and out["p"].b == 5 and out["n"] is None
    assert out["x"][1][1] == "tag" and torch.equal(out["x"][0], torch.ones(1))


@torch.no_grad()
def test_split_with_streamed_blocks_is_bitwise_equal_and_really_streams():
    """A plan that also streams (what fits on no device): the streamed blocks run on the plan's stream device
    through a BlockStreamer (parked on the host, copied into its ring every step); the split output equals the
    unsplit model's, and disable() gives every block back."""
    model = _dit()
    inputs = _dit_inputs()
    expected = model(*inputs)
    # 3 resident blocks, 3 streamed through a ring of 2 slots: the streamed blocks must be copied in every call
    plan = plan_placement(model, [10 ** 9, 10 ** 9], blocks_resident=3, devices=["cpu", "cpu"], prefetch=1)
    assert len(plan.streamed) == 3 and plan.ring_slots == 2
    split = enable_multi_device(model, plan)
    streamer = split.streamer
    assert streamer is not None and len(streamer.streamed_indices) == 3
    assert "streaming 3/" in split.summary()
    for _ in range(2):
        assert torch.equal(model(*inputs), expected)
    assert streamer.stats.copies >= 5  # 3 in the first call, and again in the second (only 2 slots)
    split.disable()
    assert split.streamer is None and not streamer._handles
    assert torch.equal(model(*inputs), expected)


def test_plan_for_other_blocks_and_double_enable_are_errors():
    model = _dit()
    other = plan_placement(make_dit(depth=3), 10 ** 9, devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="plan was made for blocks"):
        enable_multi_device(model, other)
    split = enable_multi_device(model, CPU2)
    with pytest.raises(RuntimeError, match="already split"):
        enable_multi_device(model, CPU2)
    split.disable()
    streamer = enable_block_streaming(model, "cpu", blocks_resident=2)
    with pytest.raises(RuntimeError, match="block-streaming"):
        enable_multi_device(model, CPU2)
    streamer.disable()


def test_budgets_below_the_critical_need_name_the_numbers():
    model = _dit()
    with pytest.raises(PlanError, match="sum to"):
        plan_placement(model, [10, 10], devices=["cpu", "cpu"])


# ---------------------------------------------------------------------------------------- gpu_budgets_gb

from comfyui_headroom.integrations.hunyuan3.placement import max_memory_for_budget, max_memory_for_budgets  # noqa: E402
from comfyui_headroom.memory.budgets import check_budgets_cover, parse_gpu_budgets, plan_for_gpus  # noqa: E402

GiB = 1024 ** 3


def test_parse_gpu_budgets_lists_and_single_numbers():
    assert parse_gpu_budgets("40,40", 2) == {0: 40 * GiB, 1: 40 * GiB}
    assert parse_gpu_budgets(" 30 , 10.5 ", 2) == {0: 30 * GiB, 1: int(10.5 * GiB)}
    assert parse_gpu_budgets("24", 2) == {0: 24 * GiB, 1: 24 * GiB}
    assert parse_gpu_budgets("24", 1) == {0: 24 * GiB}
    assert parse_gpu_budgets([8, 16], 2) == {0: 8 * GiB, 1: 16 * GiB}
    assert parse_gpu_budgets("0,10", 2, device_totals=[80 * GiB, 80 * GiB]) == {0: int(80 * GiB * 0.55), 1: 10 * GiB}


@pytest.mark.parametrize("text, count, message", [
    ("40,40,40", 2, "3 budgets but 2 GPUs"),
    ("40,40", 1, "2 budgets but 1 GPUs"),
    ("40,", 2, "numbers separated by commas"),
    ("40,abc", 2, "not all numbers"),
    ("40,-1", 2, "cuda:1 is -1.0"),
    ("0,40", 2, "cuda:0 budget 0 means 55 %"),
    ("40", 0, "0 are present"),
])
def test_parse_gpu_budgets_errors_name_the_numbers(text, count, message):
    with pytest.raises(ValueError, match=message):
        parse_gpu_budgets(text, count)


def test_budgets_below_the_critical_need_are_an_error():
    with pytest.raises(PlanError, match=r"cuda:0 1.00 GB, cuda:1 1.00 GB\) sum to 2.00 GB, below the 3.00 GB"):
        check_budgets_cover({0: GiB, 1: GiB}, 3 * GiB)
    check_budgets_cover({0: GiB, 1: 2 * GiB}, 3 * GiB)


def test_plan_for_gpus_splits_and_reuses_planner_errors():
    model = _dit()
    block = module_bytes(model.blocks[0])
    head = sum(module_bytes(getattr(model, n)) for n in ("x_embed", "t_embed", "ctx_embed")) + model.freqs.nbytes
    plan = plan_for_gpus(model, {0: head + 3 * block, 1: 10 ** 6})
    assert [dp.device for dp in plan.devices] == ["cuda:0", "cuda:1"] and not plan.streamed
    assert plan.resident_blocks("cuda:0") == ["blocks.0", "blocks.1", "blocks.2"]
    with pytest.raises(PlanError, match="sum to"):
        plan_for_gpus(model, {0: 100, 1: 100})


def test_max_memory_per_gpu_from_a_budget_list():
    mm = max_memory_for_budgets("40,30", device_count=2, cpu_bytes=5)
    assert mm == {0: 40 * GiB, 1: 30 * GiB, "cpu": 5}
    assert max_memory_for_budgets("0", device_count=2, device_totals=[100 * GiB, 100 * GiB], cpu_bytes=1)[1] == 55 * GiB
    with pytest.raises(ValueError, match="3 budgets but 2 GPUs"):
        max_memory_for_budgets("1,2,3", device_count=2, cpu_bytes=1)
    with pytest.raises(PlanError, match="below the"):
        max_memory_for_budgets("1,1", device_count=2, cpu_bytes=1, need_bytes=5 * GiB)
    with pytest.raises(ValueError, match="external"):
        max_memory_for_budgets("2,40", device_count=2, external_vram_gb=3, cpu_bytes=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs at least one CUDA GPU"):
            max_memory_for_budget("40,40", cpu_bytes=1)  # the string form asks torch how many GPUs there are


@torch.no_grad()
def test_each_module_makes_its_device_current_before_it_runs(monkeypatch):
    model = _dit()
    split = enable_multi_device(model, CPU2)
    seen = []
    real = multi_device.make_current
    monkeypatch.setattr(multi_device, "make_current", lambda device: (seen.append(device), real(device)))
    model(*_dit_inputs())
    assert len(seen) == 6 + 4 and all(d == torch.device("cpu") for d in seen)
    split.disable()


def test_parse_devices_and_their_budgets():
    from comfyui_headroom.memory.budgets import parse_device_budgets, parse_devices

    assert parse_devices("", 2) == [] and parse_devices(" ", 0) == []
    assert parse_devices("cuda:0, cuda:1", 2) == ["cuda:0", "cuda:1"] and parse_devices("1,0", 2) == ["cuda:1", "cuda:0"]
    assert parse_devices("cpu,cpu", 0) == ["cpu", "cpu"]
    for text, count, message in [("cuda:0,cuda:2", 2, r"cuda:2 does not exist \(2 CUDA GPU\(s\) present"),
                                 ("cuda:0,cuda:1", 0, "no CUDA GPU is present"),
                                 ("cuda:0", 2, "two or more devices"),
                                 ("cuda:0,gpu1", 2, "'gpu1' is not a device"),
                                 ("cuda:1,1", 2, "names a GPU twice")]:
        with pytest.raises(ValueError, match=message):
            parse_devices(text, count)
    assert parse_device_budgets("", ["cuda:0", "cuda:1"]) is None
    assert parse_device_budgets("40,20", ["cuda:0", "cuda:1"]) == [40 * GiB, 20 * GiB]
    assert parse_device_budgets("8", ["cuda:0", "cuda:1"]) == [8 * GiB, 8 * GiB]
    with pytest.raises(ValueError, match="gives 3 budgets for 2 devices"):
        parse_device_budgets("1,2,3", ["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match="the budget of cuda:1 is 0.0"):
        parse_device_budgets("4,0", ["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match="are not all numbers"):
        parse_device_budgets("4,x", ["cuda:0", "cuda:1"])


def test_soft_unload_refuses_a_split_model():
    from comfyui_headroom.memory import soft_unload

    model = _dit()
    split = enable_multi_device(model, ["cpu", "cpu"])
    with pytest.raises(ValueError, match="split across devices; call disable_multi_device"):
        soft_unload(model, pin_memory=False)
    split.disable()
    soft_unload(model, pin_memory=False)  # once the split is gone it parks as usual
