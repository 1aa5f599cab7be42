"""The built-in formats' names and one-line summaries: plain Python, no torch.

Each built-in format class (:mod:`.headroom`, :mod:`.comfy`, :mod:`.comfy_legacy`, :mod:`.plain`) takes its name and
summary from here, and the command line lists the ``--layout`` choices from here without importing torch. A format
registered later is a valid ``--layout`` too: the converter checks the layout against the registry.
"""

HEADROOM, COMFY, COMFY_LEGACY, PLAIN = "headroom", "comfy", "comfy_legacy", "plain"

SUMMARIES = {
    HEADROOM: "ours: rowwise, block or tensorwise scales",
    COMFY: "ComfyUI's int8_tensorwise, loads in stock ComfyUI; rowwise or tensorwise, no block",
    COMFY_LEGACY: "older ComfyUI files: the header's _quantization_metadata names the INT8 layers",
    PLAIN: "lightx2v / OneTrainer: an int8 weight and its scale, nothing else",
}
WRITABLE = (HEADROOM, COMFY)  # the layouts the built-in registry writes, in registration order (--layout)
DEFAULT_LAYOUT = HEADROOM
