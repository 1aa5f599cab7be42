"""What a user gives the HunyuanImage-3 road besides the folder: numbers, choices, words, installed packages - and
bitsandbytes' cast notice, said once instead of once per layer and step."""

import ast
import re
from pathlib import Path

from comfyui_headroom.nodes import hunyuan3_nodes as nodes

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ 4. words a user understands


def _strings(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_no_internal_source_note_names_in_what_users_read():
    files = sorted((ROOT / "integrations" / "hunyuan3").glob("*.py")) + [ROOT / "nodes" / "hunyuan3_nodes.py"]
    found = [(f.name, s[:60]) for f in files for s in _strings(f) if re.search(r"\bseeds? 0\d\d\b", s, re.I)]
    assert found == []
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        for spec in [*cls.INPUT_TYPES()["required"].values(), *cls.INPUT_TYPES().get("optional", {}).values()]:
            assert not re.search(r"\bseed 0\d\d", str(spec[1:]), re.I), spec
