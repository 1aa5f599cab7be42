"""Find a model's repeated blocks (the unit we place, stream and count).

A model is "a list of blocks + the rest". The blocks are given explicitly (modules, or attribute paths such
as ``"model.layers"`` / ``["double_blocks", "single_blocks"]``) or found automatically: every
``nn.ModuleList`` with at least 2 children that holds at least 10 % of the model's bytes and is not inside
another such list, in registration order (Flux: double blocks, then single blocks).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .tensors import module_bytes

AUTO_MIN_SHARE = 0.10


def _get_path(model: nn.Module, path: str) -> nn.Module:
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{type(model).__name__} has no attribute path {path!r} (stopped at {part!r})")
        obj = getattr(obj, part)
    return obj


def find_block_lists(model: nn.Module) -> list[str]:
    """Attribute paths of the block lists found automatically (see module docstring)."""
    total = module_bytes(model)
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or not name:
            continue
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        if total and module_bytes(mod) >= AUTO_MIN_SHARE * total:
            found.append(name)
    return found


def resolve_blocks(model_or_blocks, blocks=None) -> tuple[nn.Module | None, list[str], list[nn.Module]]:
    """``(model or None, block names, block modules)`` in execution order.

    ``model_or_blocks``: an ``nn.Module`` (then ``blocks`` picks the lists: None = automatic, a path, a list of
    paths, or a list of modules), or directly a sequence of block modules (an ``nn.ModuleList`` or a list).
    """
    if isinstance(model_or_blocks, nn.ModuleList) and blocks is None:
        mods = list(model_or_blocks)
        return None, [str(i) for i in range(len(mods))], mods
    if not isinstance(model_or_blocks, nn.Module):
        mods = list(model_or_blocks)
        if not all(isinstance(m, nn.Module) for m in mods):
            raise TypeError("blocks must be nn.Module instances")
        return None, [str(i) for i in range(len(mods))], mods
    model = model_or_blocks
    if blocks is None:
        paths = find_block_lists(model)
        if not paths:
            raise ValueError(f"{type(model).__name__}: no block list found (no nn.ModuleList holding >= "
                             f"{AUTO_MIN_SHARE:.0%} of the weights); pass blocks='model.layers' or the list of blocks")
    elif isinstance(blocks, str):
        paths = [blocks]
    elif all(isinstance(b, str) for b in blocks):
        paths = list(blocks)
    else:
        mods = list(blocks)
        by_id = {id(m): n for n, m in model.named_modules()}
        names = []
        for i, m in enumerate(mods):
            if id(m) not in by_id:
                raise ValueError(f"block {i} ({type(m).__name__}) is not a submodule of {type(model).__name__}")
            names.append(by_id[id(m)])
        return model, names, mods
    names, mods = [], []
    for path in paths:
        container = _get_path(model, path)
        children = list(container) if isinstance(container, (nn.ModuleList, nn.Sequential, Sequence)) else None
        if children is None:
            raise ValueError(f"{path!r} is a {type(container).__name__}, not a list of blocks")
        for i, child in enumerate(children):
            names.append(f"{path}.{i}")
            mods.append(child)
    return model, names, mods
