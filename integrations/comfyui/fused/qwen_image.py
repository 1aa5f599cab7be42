"""Fused forwards of Qwen-Image (``comfy.ldm.qwen_image.model.QwenImageTransformerBlock``): not written yet (ComfyUI's own forward runs)."""

FORWARDS: dict = {}
