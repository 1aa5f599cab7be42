"""What a user gives the HunyuanImage-3 road besides the folder: numbers, choices, words, installed packages - and
bitsandbytes' cast notice, said once instead of once per layer and step."""

import ast
import logging
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from comfyui_headroom.integrations.hunyuan3 import bnb, inputs
from comfyui_headroom.integrations.hunyuan3 import loader as hf_loader
from comfyui_headroom.integrations.hunyuan3.generate import GenerateRequest, generate
from comfyui_headroom.integrations.hunyuan3.inputs import LoaderError, MissingPackage
from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model
from comfyui_headroom.integrations.hunyuan3.placement import max_memory_for_budgets, resolve_budget
from comfyui_headroom.nodes import hunyuan3_nodes as nodes
from hunyuan3_fake import build_fake_folder

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3
BAD_GB = [math.nan, math.inf, -math.inf, -1.0, 1e9, "forty", True]


@pytest.fixture(scope="module")
def fake_folder(tmp_path_factory):
    return build_fake_folder(tmp_path_factory.mktemp("hy3in") / "HunyuanImage-3-fake")


@pytest.fixture
def no_weights_read(monkeypatch):
    monkeypatch.setattr(hf_loader, "_from_pretrained_tracked", lambda *a, **k: pytest.fail("weights were read"))


# ------------------------------------------------------------------------------ 2. the cast notice, once


def _cast_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if bnb.CAST_NOTICE in r.getMessage()]


def test_bitsandbytes_cast_notice_is_said_once_per_process(fake_folder, caplog, monkeypatch):
    monkeypatch.setattr(bnb, "CAST_NOTICE_FILTER", bnb._OncePerProcess())
    int8 = load_hf_model(fake_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True)
    layer = int8.model.model.layers[0].mlp.experts[0].down_proj
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16, device=layer.weight.device)  # the GPU on CUDA
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # outside our calls: bitsandbytes as it is, one line per call
            layer(x)
        assert len(_cast_lines(caplog)) == 3
        caplog.clear()
        request = GenerateRequest(prompt="a fox", steps=2, width=64, height=64, offload_mode="disabled")
        for _ in range(2):
            generate(int8, request)
        lines = _cast_lines(caplog)
        assert len(lines) == 1 and "said once" in lines[0], lines
        bnb.logging.getLogger(bnb.BNB_MATMUL_LOGGER).warning("another bitsandbytes warning")
        assert "another bitsandbytes warning" in caplog.text  # only the cast notice is held back
        caplog.clear()
        layer(x)  # after our calls the filter is gone again
        assert len(_cast_lines(caplog)) == 1
    assert bnb.CAST_NOTICE_FILTER not in bnb.logging.getLogger(bnb.BNB_MATMUL_LOGGER).filters


def test_older_bitsandbytes_cast_warning_is_said_once_too(monkeypatch):
    """bitsandbytes < 0.46 said it through warnings.warn."""
    monkeypatch.setattr(bnb, "CAST_NOTICE_FILTER", bnb._OncePerProcess())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            with bnb.cast_notice_once():
                for _ in range(5):
                    warnings.warn(f"{bnb.CAST_NOTICE} torch.bfloat16 to float16 during quantization")
                warnings.warn("something else")
    texts = [str(w.message) for w in seen]
    assert sum(bnb.CAST_NOTICE in t for t in texts) == 1 and texts.count("something else") == 2, texts


# ------------------------------------------------------------------------------ 3. the optional extra


@pytest.mark.parametrize("package, mode", [("transformers", "bf16"), ("accelerate", "nf4"), ("bitsandbytes", "int8")])
def test_a_missing_package_names_itself_and_the_install_command(package, mode, fake_folder, monkeypatch,
                                                                  no_weights_read):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    with pytest.raises(MissingPackage) as info:
        load_hf_model(fake_folder, mode, trust_remote_code=True, int8_engine="bitsandbytes")
    message = str(info.value)
    assert f"'{package}'" in message and inputs.EXTRA_INSTALL in message and "pip install -r requirements.txt" in message
    assert "\n" not in message and info.value.__cause__ is None


def test_the_loader_node_says_it_too_and_bf16_does_not_need_bitsandbytes(fake_folder, monkeypatch, no_weights_read):
    node = nodes.Hunyuan3LoaderBF16Budget()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "accelerate", None)
        with pytest.raises(MissingPackage, match=r"'accelerate'.*comfyui-headroom\[hunyuan3\]"):
            node.load(str(fake_folder), 0.0, 0.0, True, "sdpa")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(pytest.fail.Exception, match="weights were read"):  # past the package check
        node.load(str(fake_folder), 0.0, 0.0, True, "sdpa")


def test_an_installed_package_that_does_not_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "hy3_broken_pkg").mkdir()
    (tmp_path / "hy3_broken_pkg" / "__init__.py").write_text("import hy3_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingPackage, match=r"hy3_broken_pkg is installed but does not import \(ModuleNotFoundError: "
                                             r"No module named 'hy3_dependency_that_is_missing'\)"):
        inputs.require_packages(["hy3_broken_pkg"])


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


# ------------------------------------------------------------------------------ 5. choices from their owner


def test_the_nodes_offer_the_packages_choices_in_the_saved_order(monkeypatch):
    monkeypatch.setattr(nodes, "model_folder_choices", lambda: ["HunyuanImage-3"])
    loader = nodes.Hunyuan3LoaderInt8Budget.INPUT_TYPES()
    gen = nodes.Hunyuan3GenerateLowVramBudget.INPUT_TYPES()["required"]
    offered = {"attn_implementation": loader["required"]["attn_implementation"][0],
               "device_map": loader["optional"]["device_map"][0], "offload_mode": gen["offload_mode"][0],
               "post_action": gen["post_action"][0]}
    owners = {"attn_implementation": inputs.ATTENTION_IMPLEMENTATIONS, "device_map": inputs.DEVICE_MAPS,
              "offload_mode": inputs.OFFLOAD_MODES, "post_action": inputs.POST_ACTIONS}
    assert offered == {k: list(v) for k, v in owners.items()}
    assert offered == {"attn_implementation": ["sdpa", "eager", "flash_attention_2"], "device_map": ["auto", "manual"],
                       "offload_mode": ["disabled", "smart", "always"], "post_action": ["keep", "soft_unload", "unload"]}
    source = ast.parse((ROOT / "nodes" / "hunyuan3_nodes.py").read_text())
    values = {v for choices in owners.values() for v in choices}
    literal_lists = [ast.unparse(n) for n in ast.walk(source) if isinstance(n, (ast.List, ast.Tuple)) and n.elts
                     and all(isinstance(e, ast.Constant) and e.value in values for e in n.elts)]
    assert literal_lists == []  # nothing repeated by hand


# ------------------------------------------------------------------------------ 6. numbers


@pytest.mark.parametrize("value", BAD_GB, ids=str)
@pytest.mark.parametrize("name", ["budget_gb", "external_vram_gb", "reserve_gb"])
def test_a_bad_gb_number_is_refused_with_the_range_before_the_folder_is_read(name, value):
    shown = {"budget_gb": "gpu_budget_gb"}.get(name, name)
    with pytest.raises(LoaderError, match=rf"^{shown}=.*: give a number of GB from 0 to 1024"):
        load_hf_model("/no/such/folder", "int8", int8_engine="bitsandbytes", **{name: value})  # the number is checked first


@pytest.mark.parametrize("value", [-1, 257, 10 ** 12, 2.5, True, "6"])
def test_bad_gpu_layers_are_refused(value):
    with pytest.raises(LoaderError, match=r"^gpu_layers=.*: give a whole number from 0 to 256$"):
        load_hf_model("/no/such/folder", "int8", int8_engine="bitsandbytes", device_map="manual", gpu_layers=value)


def test_a_bad_number_on_the_node_keeps_the_cached_model(fake_folder, monkeypatch):
    cached = object()
    monkeypatch.setattr(nodes.CACHE, "loaded", cached)
    monkeypatch.setattr(nodes.CACHE, "key", ("other",))
    with pytest.raises(LoaderError, match="gpu_budget_gb=nan"):
        nodes.load_cached(str(fake_folder), "int8", math.nan, 0.0, True, "sdpa")
    assert nodes.CACHE.loaded is cached


@pytest.mark.parametrize("text, message", [
    ("inf", "accepted: 0.001 to 1,024 GB"), ("40,inf", "the budget of cuda:1 is inf; accepted"),
    ("2000", "the budget of cuda:0 is 2000.0; accepted: 0.001 to 1,024 GB"), ("1e300", "accepted: 0.001 to 1,024 GB"),
    ("nan", "the budget of cuda:0 is nan; accepted"), ("-5", "the budget of cuda:0 is -5.0; accepted"),
    ("40,x", "not all numbers")])
def test_gpu_budgets_text_goes_through_memory_budgets_and_is_range_checked(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        max_memory_for_budgets(text, device_count=2, device_totals=[80 * GB, 80 * GB], cpu_bytes=GB)


def test_a_budget_above_the_card_is_clamped_to_it_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_budget(100, 80 * GB) == 80 * GB
        assert max_memory_for_budgets("100,20", device_count=2, device_totals=[80 * GB, 80 * GB], external_vram_gb=4,
                                      cpu_bytes=GB) == {0: 76 * GB, 1: 16 * GB, "cpu": GB}
    assert caplog.text.count("clamped to the card") == 2
    for bad in (math.nan, math.inf, -1, 5000):
        with pytest.raises(LoaderError, match="from 0 to 1024"):
            resolve_budget(bad, 80 * GB)


@pytest.mark.parametrize("field, value, message", [
    ("budget_override_gb", math.nan, "budget_override_gb=nan: give a number of GB from 0 to 1024"),
    ("budget_override_gb", math.inf, "budget_override_gb=inf"), ("budget_override_gb", -2.0, "budget_override_gb=-2.0"),
    ("budget_override_gb", 1e6, "budget_override_gb=1000000.0"), ("guidance", math.nan, "guidance=nan"),
    ("offload_mode", "sometimes", "offload_mode='sometimes': choose one of disabled, smart, always")])
def test_a_bad_run_input_is_refused_before_anything_moves(field, value, message):
    request = GenerateRequest(prompt="a fox", **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(None, request)  # checked before the model is touched
