"""transformers 5.x shims for remote code written against 4.x (integrations/hunyuan3/compat.py), on the CPU.

The fake (tests/fixtures/hunyuan3_fake) uses the transformers API points where Tencent's HunyuanImage-3 code
breaks under 5.x, written the 4.x way with its own names: a ``StaticCache`` subclass that initializes its layers
with ``lazy_initialization(key_states)``, a denoising loop through ``prepare_inputs_for_generation`` /
``_update_model_kwargs_for_generation`` (``ALL_CACHE_NAMES``), and the "auto" size through ``generate``. Each
test that must see the fake unshimmed builds its own folder: the shims change the remote classes, and a folder
name gives its own module.
"""

import itertools
import re
import sys
import types

import numpy as np
import pytest
import torch
from comfyui_headroom.integrations.hunyuan3 import compat
from comfyui_headroom.integrations.hunyuan3 import loader as hf_loader
from comfyui_headroom.integrations.hunyuan3.loader import LoaderError
from hunyuan3_fake import build_fake_folder

TRANSFORMERS5 = pytest.mark.skipif(compat.transformers_major() < 5, reason="the breaks are those of transformers 5.x")
_names = itertools.count()


def _fresh_fake(tmp_path_factory):
    """A fake model whose classes no shim has touched (a new folder name: a new remote module)."""
    from transformers import AutoModelForCausalLM

    folder = build_fake_folder(tmp_path_factory.mktemp("compat") / f"HunyuanFakeCompat{next(_names)}")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    hf_loader.restore_generation_config(model, folder)
    return model


def _image(model, size=(64, 64)):
    return np.asarray(model.generate_image("a red fox", seed=1, image_size=size, diff_infer_steps=3,
                                           diff_guidance_scale=2.0))


@TRANSFORMERS5
def test_unshimmed_the_fake_breaks_under_transformers_5_where_tencents_code_does(tmp_path_factory):
    """Each shim left out gives the failure Tencent's code gives (found running it at a tiny size on a CPU)."""
    model = _fresh_fake(tmp_path_factory)
    cls = type(model)
    cache_cls = compat.static_cache_subclasses(sys.modules[cls.__module__])
    assert [c.__name__ for c in cache_cls] == ["TinyStaticCache"]
    with pytest.raises(TypeError, match=r"lazy_initialization\(\) missing 1 required positional argument: 'value_states'"):
        _image(model)
    assert compat.shim_one_argument_lazy_initialization(cache_cls[0])
    import transformers.generation.utils as generation_utils

    # The rename past_key_values -> cache came within 5.x (5.25 has it, 5.17 does not): only then does it break.
    renamed = "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", [])
    if renamed:
        # the cache reaches the second step as ``cache``, read as past_key_values: attention sees the new tokens only
        with pytest.raises(RuntimeError, match="must match the size"):
            _image(model)
    assert compat.shim_update_model_kwargs_keeps_loop_keys(cls)
    if renamed:
        with pytest.raises(ValueError, match=re.escape("model_kwargs` are not used by the model: ['cache']")):
            _image(model, "auto")  # generate() checks the renamed keyword against the 4.x signature
    assert compat.shim_cache_kwarg_rename(cls)
    assert _image(model).std() > 1 and _image(model, "auto").std() > 1


@TRANSFORMERS5
def test_without_the_loop_key_shim_text_decoding_fails_on_use_cache(tmp_path_factory):
    model = _fresh_fake(tmp_path_factory)
    compat.shim_one_argument_lazy_initialization(compat.static_cache_subclasses(sys.modules[type(model).__module__])[0])
    compat.shim_cache_kwarg_rename(type(model))
    assert _image(model).std() > 1  # the denoising loop needs no loop keys
    with pytest.raises(KeyError, match="use_cache"):
        _image(model, "auto")  # generate()'s decode step reads model_kwargs["use_cache"]


@TRANSFORMERS5
def test_shimmed_the_fake_generates_and_applying_again_changes_nothing(tmp_path_factory):
    model = _fresh_fake(tmp_path_factory)
    cls = type(model)
    applied = compat.apply_transformers5_shims(model)
    assert len(applied) == 3 and any("TinyStaticCache" in a for a in applied), applied
    hooks = (cls.prepare_inputs_for_generation, cls._update_model_kwargs_for_generation)
    cache_init = compat.static_cache_subclasses(sys.modules[cls.__module__])[0].__init__
    want = _image(model)
    assert compat.apply_transformers5_shims(model) == applied  # the shims in effect, nothing wrapped twice
    assert (cls.prepare_inputs_for_generation, cls._update_model_kwargs_for_generation) == hooks
    assert compat.static_cache_subclasses(sys.modules[cls.__module__])[0].__init__ is cache_init
    assert np.array_equal(want, _image(model)) and want.std() > 1
    auto = _image(model, "auto")
    assert auto.shape[:2] != (0, 0) and auto.std() > 1


@TRANSFORMERS5
def test_the_shimmed_cache_writes_where_the_4x_code_says(tmp_path_factory):
    """The loader's probe: built the 4.x way (config, batch_size, max_cache_len, dtype), written at 1-D then
    per-row 2-D positions; the states come back where they were written."""
    model = _fresh_fake(tmp_path_factory)
    blockers = compat.transformers5_blockers(model)
    assert len(blockers) == 1 and "TinyStaticCache against the transformers" in blockers[0] \
        and "lazy_initialization" in blockers[0], blockers
    compat.apply_transformers5_shims(model)
    assert compat.transformers5_blockers(model) == []


def test_under_transformers_4_nothing_is_shimmed(tmp_path_factory, monkeypatch):
    model = _fresh_fake(tmp_path_factory)
    cls = type(model)
    before = (cls.__dict__["prepare_inputs_for_generation"], cls.__dict__["_update_model_kwargs_for_generation"])
    monkeypatch.setattr(compat, "transformers_major", lambda: 4)
    assert compat.apply_transformers5_shims(model) == []
    assert compat.prepare_transformers5_import() == []
    assert compat.transformers5_blockers(model) == []
    assert (cls.__dict__["prepare_inputs_for_generation"], cls.__dict__["_update_model_kwargs_for_generation"]) == before


@TRANSFORMERS5
def test_names_a_5x_release_removed_are_put_back_before_the_remote_import(monkeypatch):
    import transformers.generation.utils as generation_utils
    import transformers.utils as transformers_utils

    assert compat.prepare_transformers5_import() == []  # transformers 5.25 still has every name
    monkeypatch.delattr(generation_utils, "ALL_CACHE_NAMES")
    monkeypatch.delattr(transformers_utils, "add_start_docstrings")
    added = compat.prepare_transformers5_import()
    assert added == ["transformers.generation.utils.ALL_CACHE_NAMES", "transformers.utils.add_start_docstrings"]
    from transformers.generation.utils import (
        ALL_CACHE_NAMES,  # what the remote file's import block does
    )
    from transformers.utils import add_start_docstrings

    @add_start_docstrings("doc")
    def f():
        return 1

    assert ALL_CACHE_NAMES[0] == "cache" and f() == 1
    assert compat.prepare_transformers5_import() == []


def _tencent_like(monkeypatch, tmp_path_factory, name, cache_base):
    """A module shaped like Tencent's (it defines HunyuanStaticCache) around the fake's model class."""
    model = _fresh_fake(tmp_path_factory)
    module = types.ModuleType(name)
    module.HunyuanStaticCache = type("HunyuanStaticCache", (cache_base,), {"__module__": name})
    model_cls = type("HunyuanImage3ForCausalMM", (type(model),), {"__module__": name})
    monkeypatch.setitem(sys.modules, name, module)
    model.__class__ = model_cls
    return model


@TRANSFORMERS5
def test_tencent_code_with_a_4x_static_cache_loads_under_transformers_5(monkeypatch, tmp_path_factory):
    """check_transformers_version: shimmed, probed, not refused; the model generates."""
    base = _fresh_fake(tmp_path_factory)
    tiny_cache = compat.static_cache_subclasses(sys.modules[type(base).__module__])[0]
    model = _tencent_like(monkeypatch, tmp_path_factory, "fake_tencent_hunyuan_ok", tiny_cache)
    assert hf_loader.is_tencent_code(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hf_loader.check_transformers_version(model, "/models/HunyuanImage-3")
    notes = hf_loader._shim_for_transformers5(model)
    assert any("HunyuanStaticCache" in n for n in notes) and all(n.startswith("transformers 5.x shim: ") for n in notes)


@TRANSFORMERS5
def test_tencent_code_whose_cache_the_shims_cannot_bridge_is_refused_with_the_reason(monkeypatch, tmp_path_factory):
    from transformers.cache_utils import StaticCache

    class Broken(StaticCache):  # an update the 5.x cache API cannot serve
        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            return self.layers[layer_idx].key_cache, None

    model = _tencent_like(monkeypatch, tmp_path_factory, "fake_tencent_hunyuan_broken", Broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(LoaderError) as info:
        hf_loader.check_transformers_version(model, "/models/HunyuanImage-3")
    text = str(info.value)
    assert "HunyuanStaticCache against the transformers" in text and "AttributeError" in text
    assert hf_loader.TENCENT_PIP_COMMAND in text


def test_the_load_report_lists_the_shims_and_the_fake_still_is_not_tencents(tmp_path_factory):
    from comfyui_headroom.integrations.hunyuan3.generate import (
        GenerateRequest,
        generate,
    )
    from comfyui_headroom.integrations.hunyuan3.loader import load_hf_model

    folder = build_fake_folder(tmp_path_factory.mktemp("compat") / f"HunyuanFakeCompat{next(_names)}")
    loaded = load_hf_model(folder, "bf16", trust_remote_code=True)
    assert not loaded.tencent_code
    shims = [n for n in loaded.notes if n.startswith("transformers 5.x shim: ")]
    assert len(shims) == (3 if compat.transformers_major() >= 5 else 0), loaded.notes
    result = generate(loaded, GenerateRequest(prompt="a red fox", seed=2, steps=2, guidance=2.0, width=64, height=64))
    assert np.asarray(result.image).std() > 1


def test_shims_leave_transformers_own_classes_alone():
    from transformers.cache_utils import StaticCache
    from transformers.generation.utils import GenerationMixin

    module = types.ModuleType("only_transformers_names")
    module.StaticCache = StaticCache
    assert compat.static_cache_subclasses(module) == []
    assert not getattr(StaticCache.__init__, compat.SHIMMED, False)
    assert not getattr(GenerationMixin.prepare_inputs_for_generation, compat.SHIMMED, False)
