"""INT8 checkpoint formats on disk, as a registry: one module per format, each an :class:`Int8Format` registered
by name with its constraints. Each one says whether a layer is its own, reads it into our layout
(:class:`Int8LayerTensors`) and - where headroom can write it - lays out a quantized layer for an output file.

Built in (``<p>`` is a layer prefix ending with a dot, e.g. ``blocks.0.attn.qkv.``):

* ``headroom``     (:mod:`.headroom`)     ours: ``<p>weight`` + ``<p>weight_scale``, header metadata ``headroom.*``;
* ``comfy``        (:mod:`.comfy`)        ComfyUI's per-layer ``<p>comfy_quant`` JSON, incl. the rotated convrot;
* ``comfy_legacy`` (:mod:`.comfy_legacy`) older ComfyUI: header ``_quantization_metadata``;
* ``plain``        (:mod:`.plain`)        lightx2v / OneTrainer: an int8 weight and ``weight_scale``/``scale_weight``.

Adding a format = one module with an :class:`Int8Format` subclass and one :func:`register` call (in :mod:`.api`, or
in the module that defines it). :mod:`.files` describes a whole file from its headers (``headroom inspect``).

The names load on first use (PEP 562) from :mod:`.api`, which also registers the built-in formats: the built-ins'
names and summaries in :mod:`.builtin` (what ``headroom convert --help`` lists) come without torch.
"""


def __getattr__(name: str):
    if name.startswith("_") or name == "api":  # dunders, and the import of .api itself below
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import api

    if name not in api.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(api, name)
    globals()[name] = value
    return value
