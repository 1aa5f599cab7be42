"""The house rules (docs/architecture.md), read from the code's own imports with ``ast``: every import counts,
module-level or inside a function, relative or through ``comfyui_headroom.``.

* each layer imports only the layers below it (the table ``MAY_IMPORT``), so no cycle between packages can form;
* no import cycle between modules either;
* ComfyUI (``comfy``, ``folder_paths``, ...) is imported only in integrations/comfyui and nodes;
* transformers / bitsandbytes / accelerate only where the HunyuanImage-3 road or the memory layer needs them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_LIBRARY = {"tests", "bench", "docs", "workflows", "build"}
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "folder_paths",
                   "latent_preview", "server", "execution", "node_helpers", "comfyui_version"}

# Who may import whom (units: top-level packages, the two roads under integrations/ each its own).
# ``_version`` and ``units`` are ground modules that import nothing of ours: every layer may use them.
GROUND = {"_version", "units"}
MAY_IMPORT: dict[str, set[str]] = {
    "_version": set(),
    "units": set(),
    "kernels": set(),
    "quant": {"kernels"},
    "memory": {"kernels", "quant"},
    "integrations": set(),
    "integrations.comfyui": {"kernels", "quant", "memory"},
    "integrations.hunyuan3": {"kernels", "quant", "memory"},
    "demo": {"kernels", "quant", "memory"},
    "nodes": {"kernels", "quant", "memory", "integrations.comfyui", "integrations.hunyuan3"},
    "cli": {"kernels", "quant", "memory", "demo"},
    "__init__": {"nodes"},
    "__main__": {"cli"},
}
for _unit, _allowed in MAY_IMPORT.items():
    if _unit not in GROUND:
        _allowed |= GROUND
COMFYUI_ALLOWED = {"integrations.comfyui", "nodes"}


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_LIBRARY or any(p.startswith(".") for p in rel.parts) or "fixtures" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "integrations" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _resolve(name: str) -> str | None:
    """The longest module of ours that ``name`` (dotted, relative to the package root) names or lies in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path):
    """(target module of ours or None, external top-level name or None) per import in ``module``."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if module != "__init__" else []
    package = here if is_package else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                first = alias.name.split(".")[0]
                if first == "comfyui_headroom":
                    yield _resolve(alias.name.partition(".")[2]), None
                else:
                    yield None, first
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                stem = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # "from . import x" names the submodule x when there is one
                    yield _resolve(f"{stem}.{alias.name}" if stem else alias.name) or _resolve(stem) or \
                        ("__init__" if not stem else None), None
            elif node.module:
                first = node.module.split(".")[0]
                if first == "comfyui_headroom":
                    rest = node.module.partition(".")[2]
                    for alias in node.names:
                        yield _resolve(f"{rest}.{alias.name}" if rest else alias.name) or _resolve(rest), None
                else:
                    yield None, first


def _graph():
    edges: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for target, outside in _imports(module, path):
            if target is not None and target != module:
                edges[module].add(target)
            if outside is not None:
                external[module].add(outside)
    return edges, external


EDGES, EXTERNAL = _graph()


def test_the_walk_sees_the_house():
    # the walk itself must find what it checks: the layers and the imports between them
    assert {"kernels.dispatch", "quant.linear", "memory.streaming", "integrations.comfyui.ops",
            "integrations.hunyuan3.loader", "nodes", "cli"} <= set(MODULES)
    assert "kernels.dispatch" in EDGES["quant.linear"]
    assert "comfy" in EXTERNAL["integrations.comfyui.ops"]


def test_every_unit_is_in_the_table():
    assert {unit_of(m) for m in MODULES} <= set(MAY_IMPORT), "a new package needs its row in MAY_IMPORT"


def test_each_layer_imports_only_layers_below_it():
    problems = sorted(f"{a} imports {b} ({unit_of(a)} may import only {sorted(MAY_IMPORT[unit_of(a)]) or 'nothing of ours'})"
                      for a, targets in EDGES.items() for b in targets
                      if unit_of(a) != unit_of(b) and unit_of(b) not in MAY_IMPORT.get(unit_of(a), set()))
    assert not problems, "\n".join(problems)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(set(edges) | {b for bs in edges.values() for b in bs}):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop(); on_stack.discard(member); component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]; counter[0] += 1; stack.append(child); on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycle_between_packages_or_modules():
    units: dict[str, set[str]] = defaultdict(set)
    for a, targets in EDGES.items():
        for b in targets:
            if unit_of(a) != unit_of(b):
                units[unit_of(a)].add(unit_of(b))
    assert not _cycles(units)
    assert not _cycles(EDGES)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not _cycles({"a": {"b"}, "b": {"c"}})


def test_comfyui_is_imported_only_in_its_glue_and_the_nodes():
    wrong = sorted(f"{m} imports {sorted(names & COMFYUI_MODULES)}" for m, names in EXTERNAL.items()
                   if names & COMFYUI_MODULES and unit_of(m) not in COMFYUI_ALLOWED)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("library", ["kernels", "quant", "memory", "integrations.comfyui", "integrations.hunyuan3",
                                     "demo"])
def test_the_library_never_imports_the_command_line(library):
    assert not [m for m, targets in EDGES.items() if unit_of(m) == library and any(unit_of(t) == "cli" for t in targets)]
