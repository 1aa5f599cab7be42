"""Fused forwards of Kandinsky 5 (``comfy.ldm.kandinsky5.model`` encoder and decoder blocks): not written yet (ComfyUI's own forward runs)."""

FORWARDS: dict = {}
