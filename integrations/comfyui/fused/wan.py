"""Fused forwards of Wan 2.1 / 2.2 (``comfy.ldm.wan.model.WanAttentionBlock``): not written yet (ComfyUI's own forward runs)."""

FORWARDS: dict = {}
