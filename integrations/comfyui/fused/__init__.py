"""Fused INT8 forwards for ComfyUI's own transformer blocks, installed per model instance.

Why: in ComfyUI's blocks every INT8 linear layer quantizes its input in a pass of its own, right after the
norm + modulation, attention or activation that wrote that input in bf16. A fused forward has those ops write
the layer's input as INT8 rows directly (:mod:`comfyui_headroom.kernels.producers`) and the layers run only their
GEMM (``Int8Linear.forward_int8``). The numbers stay those of ComfyUI's block: the same RoPE, masks, streams and
ComfyUI's attention function (``optimized_attention``, so ``--use-sage-attention`` and attention overrides keep
working).

* :func:`install_fused_blocks` swaps the class of each matching block *instance* of one model for a subclass
  whose ``forward`` tries the fused path and otherwise runs ComfyUI's own ``forward`` (:mod:`.blocks`). ComfyUI's
  classes are never patched: another model in the same process is untouched.
* A call takes ComfyUI's forward whenever the fused path cannot give the same answer: a ``transformer_options``
  patch or block replacement, per-token modulation (``modulation_dims``), a LoRA side branch, a weight that
  ComfyUI's partial loading left on another device, a keyword argument the fused forward does not know.
* ``mode`` (:data:`FUSE_CHOICES`): ``auto`` fuses where a W8A8 kernel runs (Triton / ``_int_mm``); ``on``
  fuses wherever the layers are INT8, with the torch producers and the reference GEMM on a CPU (so CI runs every
  architecture through the fused code); ``off`` never. ``HEADROOM_FUSE_BLOCKS`` sets what the loader's
  ``fuse_blocks`` = ``auto`` means.

One module per model family (:data:`.blocks.FAMILIES`): :mod:`.flux` (Flux, Flux 2, HunyuanImage 2.1 / HunyuanVideo:
the flux blocks), :mod:`.wan`, :mod:`.qwen_image`, :mod:`.lumina` (Z-Image), :mod:`.kandinsky5`.
"""

from __future__ import annotations

from .blocks import FUSE_CHOICES, FUSE_ENV, fuse_mode, fused_stats, install_fused_blocks, uninstall_fused_blocks

__all__ = ["FUSE_CHOICES", "FUSE_ENV", "fuse_mode", "fused_stats", "install_fused_blocks", "uninstall_fused_blocks"]
