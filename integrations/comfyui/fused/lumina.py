"""Fused forwards of Z-Image / Lumina 2 (``comfy.ldm.lumina.model.JointTransformerBlock``): not written yet (ComfyUI's own forward runs)."""

FORWARDS: dict = {}
