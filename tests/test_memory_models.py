"""Tiny models for the memory tests (imported by tests/test_memory_*.py) + a sanity test of the builders.

They mirror the layouts the memory tools meet in real life: a DiT (``patch_embed`` / ``time_embed`` /
``blocks`` / ``final_layer``), a transformers-style ``model.layers`` stack with ``lm_head`` and a Flux-style
``double_blocks`` + ``single_blocks`` pair. Blocks hold nn.Linear or our Int8Linear layers.
"""

import torch
import torch.nn.functional as F
from torch import nn

from comfyui_headroom.quant import Int8Linear


def _linear(i, o, int8, dtype):
    lin = nn.Linear(i, o, dtype=torch.float32)
    if int8:
        return Int8Linear.from_linear(lin, "rowwise", compute_dtype=dtype)
    return lin.to(dtype)


class TinyBlock(nn.Module):
    """Pre-norm attention + MLP block (the shape of a DiT / LLM layer)."""

    def __init__(self, hidden=64, heads=4, int8=False, dtype=torch.float32):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, dtype=dtype)
        self.qkv = _linear(hidden, 3 * hidden, int8, dtype)
        self.proj = _linear(hidden, hidden, int8, dtype)
        self.norm2 = nn.LayerNorm(hidden, dtype=dtype)
        self.fc1 = _linear(hidden, 4 * hidden, int8, dtype)
        self.fc2 = _linear(4 * hidden, hidden, int8, dtype)
        self.register_buffer("gate", torch.linspace(0.5, 1.0, hidden, dtype=dtype))

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, h)
        x = x + self.proj(a)
        return x + self.gate * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyDiT(nn.Module):
    def __init__(self, depth=6, hidden=64, in_ch=16, int8=False, dtype=torch.float32):
        super().__init__()
        self.patch_embed = nn.Linear(in_ch, hidden, dtype=dtype)
        self.time_embed = nn.Linear(1, hidden, dtype=dtype)
        self.blocks = nn.ModuleList(TinyBlock(hidden, int8=int8, dtype=dtype) for _ in range(depth))
        self.final_layer = nn.Linear(hidden, in_ch, dtype=dtype)

    def forward(self, x, t=None):
        h = self.patch_embed(x)
        if t is not None:
            h = h + self.time_embed(t.view(-1, 1, 1).to(h.dtype))
        for block in self.blocks:
            h = block(h)
        return self.final_layer(h)


class _Inner(nn.Module):
    def __init__(self, depth, hidden, vocab):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(TinyBlock(hidden) for _ in range(depth))
        self.ln_f = nn.LayerNorm(hidden)


class TinyCausalLM(nn.Module):
    """transformers-style naming: model.wte, model.layers.N, model.ln_f, lm_head."""

    def __init__(self, depth=4, hidden=64, vocab=97):
        super().__init__()
        self.model = _Inner(depth, hidden, vocab)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.model.wte(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.ln_f(h))


class TinyFlux(nn.Module):
    """Flux-style: two block lists run one after the other."""

    def __init__(self, n_double=3, n_single=4, hidden=64):
        super().__init__()
        self.img_in = nn.Linear(16, hidden)
        self.double_blocks = nn.ModuleList(TinyBlock(hidden) for _ in range(n_double))
        self.single_blocks = nn.ModuleList(TinyBlock(hidden) for _ in range(n_single))
        self.final_layer = nn.Linear(hidden, 16)

    def forward(self, x):
        h = self.img_in(x)
        for b in self.double_blocks:
            h = b(h)
        for b in self.single_blocks:
            h = b(h)
        return self.final_layer(h)


def make_dit(depth=6, hidden=64, int8=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyDiT(depth, hidden, int8=int8, dtype=dtype).eval()


def test_builders_run_and_int8_really_quantizes():
    x = torch.randn(2, 8, 16)
    model = make_dit(int8=True)
    with torch.no_grad():
        assert model(x).shape == (2, 8, 16)
    assert model.blocks[0].fc1.weight.dtype == torch.int8
    with torch.no_grad():
        assert TinyCausalLM()(torch.randint(0, 97, (2, 5))).shape == (2, 5, 97)
        assert TinyFlux()(x).shape == (2, 8, 16)
