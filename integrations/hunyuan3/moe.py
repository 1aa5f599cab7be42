"""HunyuanImage-3's Mixture-of-Experts without the dispatch mask: route, sort by expert, grouped GEMMs, scatter back.

Tencent's eager MoE builds, per layer and step, a ``[tokens, experts, capacity]`` dispatch mask and a combine-weights
tensor of the same shape (``one_hot`` + ``einsum``) - hundreds of MB at 1 MP, tens of GB at 4 MP, which is why high
resolutions run out of memory on one card - and its fast path needs FlashInfer. :class:`HeadroomMoE` computes the
same function with activation memory O(tokens x top-k x width):

1. route exactly as Tencent's gate does (float32 router, softmax, top-k, the top-k weights renormalised to sum to 1,
   clamped at float32 eps; :func:`route`);
2. sort the token x expert pairs by expert (stable: the order inside an expert is the token order) and count them:
   ``group_offsets[e]:group_offsets[e+1]`` are expert e's rows;
3. ``gate_and_up_proj`` of every expert as ONE grouped GEMM over the sorted rows (the INT8 kernel gathers each
   token's int8 row itself), SiLU-gate (+ INT8 for the next GEMM) in one fused producer, one grouped GEMM for
   ``down_proj``;
4. each token's k results weighted and summed (a batched ``[1, k] @ [k, hidden]``), plus the shared expert.

Tokens run in chunks of :data:`CHUNK_PAIRS` token x expert pairs, so the temporaries stay bounded at any
resolution. The experts come in three forms, one forward: :class:`StackedExperts` of
:class:`~comfyui_headroom.quant.grouped.Int8GroupedLinear` (our W8A8 engine) or of
:class:`~comfyui_headroom.quant.grouped.GroupedLinear` (bf16: ``torch._grouped_mm``), or Tencent's own
``nn.ModuleList`` of per-expert MLPs (bitsandbytes layers: one call per expert on its rows).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.grouped import silu_gate, silu_gate_quantize
from ...kernels.producers import silu_mul_quantize
from ...quant.grouped import GroupedLinear, Int8GroupedLinear
from ...quant.linear import Int8Linear

log = logging.getLogger("comfyui_headroom")

# Token x expert pairs per chunk: 4096 tokens at top-8. The temporaries of one chunk at HunyuanImage-3's sizes
# (hidden 4096, expert width 3072) are ~0.5 GB; HEADROOM_MOE_CHUNK_PAIRS overrides (a larger chunk, fewer launches).
CHUNK_PAIRS = 32768


def chunk_pairs() -> int:
    value = os.environ.get("HEADROOM_MOE_CHUNK_PAIRS", "").strip()
    if not value:
        return CHUNK_PAIRS
    try:
        pairs = int(value)
    except ValueError:
        raise ValueError(f"HEADROOM_MOE_CHUNK_PAIRS={value!r} is not a whole number; unset it or give e.g. 32768") \
            from None
    if pairs < 1:
        raise ValueError(f"HEADROOM_MOE_CHUNK_PAIRS={value!r} must be at least 1")
    return pairs


class MoeUnsupported(ValueError):
    """A MoE layer whose configuration our forward does not reproduce (it then keeps Tencent's)."""


def route(gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tencent's routing for tokens ``x [T, hidden]``: ``(weights float32 [T, k], experts int64 [T, k])``.

    The router ``gate.wg`` runs in its own dtype (float32 in the release); softmax in float32; the top-k
    probabilities are divided by their sum (clamped at float32 eps) when ``norm_topk_prob`` (the release), else
    multiplied by ``routed_scaling_factor``."""
    wg = gate.wg
    weight_dtype = wg.weight.dtype if wg.weight.is_floating_point() else x.dtype
    logits = wg(x.to(weight_dtype) if weight_dtype == torch.float32 else x)
    probs = F.softmax(logits.float(), dim=1)
    k = int(gate.moe_topk)
    weights, experts = torch.topk(probs, k, dim=1)
    if getattr(gate, "norm_topk_prob", True) and k > 1:
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    else:
        weights = weights * float(getattr(gate, "routed_scaling_factor", 1.0) or 1.0)
    return weights, experts


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """Token x expert pairs sorted by expert: ``(order, token_of_row, group_offsets)``.

    ``order[i]`` is the flat pair index (``token * k + slot``) of sorted row i, ``token_of_row[i]`` its token,
    ``group_offsets [E + 1]`` the rows of each expert. No host synchronisation."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_row = order // experts.shape[1]
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, token_of_row, offsets


class StackedExperts(nn.Module):
    """The experts' two projections, each stacked over the experts (``[E, out, in]``): the grouped GEMMs' weights.

    Module names ``experts.gate_and_up_proj`` / ``experts.down_proj``; expert e of a projection is row e of the
    stack (what a LoRA key ``experts.e.gate_and_up_proj`` addresses)."""

    def __init__(self, gate_and_up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_and_up_proj = gate_and_up_proj
        self.down_proj = down_proj

    @property
    def num_experts(self) -> int:
        return self.gate_and_up_proj.num_groups

    @property
    def int8(self) -> bool:
        return isinstance(self.gate_and_up_proj, Int8GroupedLinear)

    @classmethod
    def from_mlps(cls, mlps, int8: bool, what: str = "experts") -> "StackedExperts":
        """Stack Tencent's per-expert MLPs (float layers), quantizing when ``int8``."""
        grouped = Int8GroupedLinear if int8 else GroupedLinear
        return cls(grouped.from_linears([m.gate_and_up_proj for m in mlps], f"{what}.gate_and_up_proj"),
                   grouped.from_linears([m.down_proj for m in mlps], f"{what}.down_proj"))

    def forward_rows(self, x: torch.Tensor, token_of_row: torch.Tensor, offsets: torch.Tensor,
                     order: torch.Tensor) -> torch.Tensor:
        """Every sorted row through its expert: ``x [T, hidden]`` -> ``[T * k, hidden]`` in ``x.dtype``, back in
        token x slot order (sorted row i belongs at ``order[i]``). The INT8 down projection stores its rows there
        itself; the other forms un-sort with a copy."""
        up, down = self.gate_and_up_proj, self.down_proj
        h = up.forward_sorted(x, offsets, row_index=token_of_row)
        if self.int8 and not down.lora:
            q, scale = silu_gate_quantize(h)
            del h
            return down.forward_sorted_int8(q, scale, offsets, out_dtype=x.dtype, out_row_index=order)
        act = silu_gate(h)
        del h
        return _unsorted(down.forward_sorted(act, offsets).to(x.dtype), order)


def _unsorted(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Sorted rows back to token x slot order."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def _expert_loop(experts: nn.ModuleList, x: torch.Tensor, token_of_row: torch.Tensor,
                 offsets: torch.Tensor) -> torch.Tensor:
    """Tencent's per-expert MLP modules (bitsandbytes layers) on their rows, one call per expert with rows."""
    out = x.new_empty(token_of_row.shape[0], x.shape[1])
    bounds = offsets.tolist()
    for e, expert in enumerate(experts):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            # Tencent's HunyuanMLP splits gate and up on dim 2: it takes [batch, tokens, hidden]
            out[start:end] = expert(x[token_of_row[start:end]][None])[0].to(x.dtype)
    return out


class HeadroomMoE(nn.Module):
    """Drop-in for Tencent's ``HunyuanMoE`` (same children names: ``gate``, ``shared_mlp``, ``experts``), mask-free."""

    def __init__(self, gate: nn.Module, shared_mlp: nn.Module | None, experts: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.gate = gate
        self.shared_mlp = shared_mlp
        self.experts = experts
        self.num_experts = num_experts

    @property
    def engine(self) -> str:
        if isinstance(self.experts, StackedExperts):
            return "headroom-int8" if self.experts.int8 else "grouped-bf16"
        return "per-expert"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = torch.empty_like(x)
        tokens_per_chunk = max(1, chunk_pairs() // int(self.gate.moe_topk))
        for start in range(0, x.shape[0], tokens_per_chunk):
            chunk = x[start:start + tokens_per_chunk]
            out[start:start + chunk.shape[0]] = self._routed(chunk)
        out = out.reshape(shape)
        if self.shared_mlp is not None:
            out = out + self._shared(x).reshape(shape)
        return out

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert on ``x [T, hidden]``. With INT8 layers, SiLU-gate and the quantization for ``down_proj``
        run as one producer (as for the routed experts); otherwise Tencent's own MLP forward."""
        mlp = self.shared_mlp
        up, down = getattr(mlp, "gate_and_up_proj", None), getattr(mlp, "down_proj", None)
        if not (isinstance(up, Int8Linear) and isinstance(down, Int8Linear)
                and getattr(mlp, "hidden_act", "silu") == "silu"):
            return mlp(x[None])[0]  # Tencent's HunyuanMLP splits gate and up on dim 2: [batch, tokens, hidden]
        h = up(x)
        if down.takes_int8_input(h[:, : down.in_features]):
            if torch.compiler.is_compiling():  # the producer that is a custom op (Tencent's order: x1 * silu(x2))
                half = down.in_features
                return down.forward_int8(silu_mul_quantize(h[:, half:], h[:, :half]), x.dtype)
            return down.forward_int8(silu_gate_quantize(h), x.dtype)
        return down(silu_gate(h))

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for the tokens ``x [t, hidden]``."""
        weights, experts = route(self.gate, x)
        order, token_of_row, offsets = sort_by_expert(experts, self.num_experts)
        if isinstance(self.experts, StackedExperts):
            unsorted = self.experts.forward_rows(x, token_of_row, offsets, order)
        else:
            unsorted = _unsorted(_expert_loop(self.experts, x, token_of_row, offsets), order)
        # Each token's k rows weighted and summed in one batched matmul (float32 accumulation inside; Tencent's
        # einsum combines in the activation dtype too).
        t, k = experts.shape
        combined = torch.bmm(weights.to(x.dtype).view(t, 1, k), unsorted.view(t, k, -1))
        return combined.view(t, -1)


# ------------------------------------------------------------------------------------ installing it


def is_tencent_moe(module: nn.Module) -> bool:
    """Tencent's ``HunyuanMoE`` (or the test fake's): a router ``gate.wg`` and a ModuleList of experts."""
    gate = getattr(module, "gate", None)
    return (not isinstance(module, HeadroomMoE) and gate is not None and hasattr(gate, "wg")
            and isinstance(getattr(module, "experts", None), nn.ModuleList))


def _holds_stacked_experts(module: nn.Module) -> bool:
    """A MoE whose experts our INT8 loader already stacked, still on Tencent's forward."""
    return (not isinstance(module, HeadroomMoE) and hasattr(getattr(module, "gate", None), "wg")
            and isinstance(getattr(module, "experts", None), StackedExperts))


def check_supported(moe: nn.Module, name: str) -> None:
    """Refuse what our forward does not reproduce (Tencent's code then keeps its own forward)."""
    config = getattr(moe, "config", None)
    gate = moe.gate
    if getattr(gate, "group_limited_greedy", False):
        raise MoeUnsupported(f"{name}: group-limited routing (group_limited_greedy) is not reproduced")
    if getattr(gate, "drop_tokens", False):
        raise MoeUnsupported(f"{name}: token dropping (moe_drop_tokens) is not reproduced")
    act = getattr(config, "hidden_act", "silu") if config is not None else "silu"
    if act != "silu":
        raise MoeUnsupported(f"{name}: experts with hidden_act={act!r}; only SwiGLU (silu) experts are grouped")


def replace_moe(model: nn.Module, stack: str | None = None) -> dict[str, str]:
    """Swap every Tencent MoE of ``model`` for :class:`HeadroomMoE`; returns ``{layer name: engine}``.

    ``stack``: ``"int8"`` quantizes the float experts into an INT8 stack, ``"bf16"`` stacks them as they are,
    None keeps the per-expert modules (bitsandbytes layers). A MoE already holding a :class:`StackedExperts`
    (our INT8 loader builds them directly) only gets the new forward. Layers our forward does not reproduce keep
    Tencent's forward (logged)."""
    done: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not (is_tencent_moe(module) or _holds_stacked_experts(module)):
            continue
        try:
            check_supported(module, name)
        except MoeUnsupported as err:
            log.warning("%s; this layer keeps Tencent's MoE forward", err)
            continue
        experts = module.experts
        if isinstance(experts, nn.ModuleList) and stack is not None:
            experts = StackedExperts.from_mlps(list(experts), int8=stack == "int8", what=f"{name}.experts")
        count = len(experts) if isinstance(experts, nn.ModuleList) else experts.num_experts
        new = HeadroomMoE(module.gate, getattr(module, "shared_mlp", None), experts, count)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        done[name] = new.engine
    return done


def moe_engines(model: nn.Module) -> dict[str, int]:
    """How many MoE layers run which engine (for the status line)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, HeadroomMoE):
            counts[module.engine] = counts.get(module.engine, 0) + 1
        elif is_tencent_moe(module):
            counts["tencent"] = counts.get("tencent", 0) + 1
    return counts
