"""Every ``headroom`` call, ``--help`` included, must not wait 2-3 s for torch: the parsers of convert, inspect and
demo import nothing heavy, and ``headroom convert ...`` builds only its own module's parser. The choices they
show still come from the library (torch-free constants), checked against the live registry here."""

import json
import subprocess
import sys

import pytest
from comfyui_headroom import cli
from comfyui_headroom.kernels import constants
from comfyui_headroom.kernels.int8 import DEFAULT_BLOCK_SIZE, METHODS
from comfyui_headroom.kernels.rotation import COMFY_ROTATION_GROUPS, ROTATION_GROUPS
from comfyui_headroom.quant.formats import builtin, registered_formats, writable_formats

HEAVY = ("torch", "safetensors.torch", "triton")
OURS = (".convert", ".demo")  # convert + inspect, demo
FOREIGN = (".memory", ".kernels")  # gpu-info, kernels: another engineer's modules


def _heavy_after(tmp_path, statements: str) -> list[str]:
    """The heavy modules loaded after running ``statements`` in a fresh interpreter."""
    code = (f"import sys, json, contextlib, io\n{statements}\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    # cwd outside the repo: `python -c` puts the cwd on sys.path, where our kernels/ would shadow HF `kernels`
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def _help_of(*names: str) -> str:
    """Statements that print each subcommand's --help (formatting the help expands every choice and default)."""
    return "\n".join(f"with contextlib.redirect_stdout(io.StringIO()):\n"
                     f"    try:\n        c.main([{name!r}, '--help'])\n    except SystemExit:\n        pass"
                     for name in names)


def test_our_parsers_import_nothing_heavy(tmp_path):
    assert _heavy_after(tmp_path, "import comfyui_headroom.cli as c") == []
    statements = (f"import comfyui_headroom.cli as c\np = c.build_parser({OURS!r})\np.format_help()\n"
                  + _help_of("convert", "inspect", "demo"))
    assert _heavy_after(tmp_path, statements) == []


def test_headroom_convert_help_imports_nothing_heavy_whatever_the_other_subcommands_import(tmp_path):
    """`headroom convert|inspect|demo ...` builds its own module's parser only."""
    assert _heavy_after(tmp_path, "import comfyui_headroom.cli as c\n" + _help_of("convert", "inspect", "demo")) == []


def test_the_whole_parser(tmp_path):
    """`headroom --help` needs every subcommand; it is torch-free once the foreign modules are too."""
    heavy = {name: _heavy_after(tmp_path, f"import comfyui_headroom.cli{name}") for name in FOREIGN}
    if any(heavy.values()):
        pytest.skip("`headroom --help` still imports torch through " + ", ".join(
            f"cli/{name[1:]}.py ({', '.join(mods)} at module level)" for name, mods in heavy.items() if mods)
            + " - not this module's to change")
    assert _heavy_after(tmp_path, "import comfyui_headroom.cli as c\nc.build_parser().format_help()") == []


def test_subcommand_table_matches_the_parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.SUBCOMMANDS)
    for name, module in cli.SUBCOMMANDS.items():  # each name is registered by the module the table names
        alone = next(a for a in cli.build_parser((module,))._actions if a.dest == "command")
        assert name in alone.choices


def test_constants_are_the_librarys():
    assert (METHODS, DEFAULT_BLOCK_SIZE) == (constants.METHODS, constants.DEFAULT_BLOCK_SIZE)
    assert (ROTATION_GROUPS, COMFY_ROTATION_GROUPS) == (constants.ROTATION_GROUPS, constants.COMFY_ROTATION_GROUPS)
    assert tuple(f.name for f in writable_formats()) == builtin.WRITABLE
    assert {f.name: f.summary for f in registered_formats()} == builtin.SUMMARIES


def test_an_unknown_layout_is_one_line(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "in.safetensors"), "--layout", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "headroom convert: error: unknown layout 'nope'; choose one of headroom, comfy"
