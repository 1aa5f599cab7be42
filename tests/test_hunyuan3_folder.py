"""A user's HunyuanImage-3 folder with a bad file: every file the loader reads (config.json, its auto_map code,
generation_config.json, the shard index and shards, the tokenizer's JSON, a pre-quantized folder's metadata and
INT8 layers) is refused before a weight is read, with one line that names the file and says what to do; the
folder is left exactly as it was.
"""

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_headroom.integrations.hunyuan3 import loader as hf_loader
from comfyui_headroom.integrations.hunyuan3.folder import INDEX
from comfyui_headroom.integrations.hunyuan3.loader import LoaderError, load_hf_model, save_quantized
from hunyuan3_fake import build_fake_folder

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
REDOWNLOAD = "re-download"
RESAVE = "re-save the folder with save_quantized"


def _metadata(file: Path) -> dict:
    with safe_open(str(file), framework="pt") as f:
        return dict(f.metadata() or {})


def _rewrite(file: Path, change_tensors=None, **metadata) -> None:
    """Write ``file`` again with its tensors (changed by ``change_tensors``) and metadata (updated)."""
    tensors, meta = load_file(file), _metadata(file)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, file, metadata={**meta, **metadata})


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    return build_fake_folder(tmp_path_factory.mktemp("hy3hard") / "float")


@pytest.fixture(scope="module")
def sharded_folder(float_folder, tmp_path_factory):
    """The float folder in two shards and an index, as large downloads come."""
    folder = tmp_path_factory.mktemp("hy3hard") / "sharded"
    shutil.copytree(float_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for shard, keys in zip(SHARDS, (names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors").unlink()
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def int8_folder(float_folder, tmp_path_factory):
    """A pre-quantized INT8-Selective folder, written by save_quantized."""
    loaded = load_hf_model(float_folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True)
    return save_quantized(loaded, tmp_path_factory.mktemp("hy3hard") / "int8")


# -- ways to break a folder; each returns the file the message must name (relative to the folder)


def write(name, data):
    def mutate(folder):
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return name
    return mutate


def make_dir(name):
    def mutate(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
        return name
    return mutate


def remove(name, named=None):
    def mutate(folder):
        (folder / name).unlink()
        return named if named is not None else name
    return mutate


def edit_json(name, change):
    def mutate(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
        return name
    return mutate


def truncate(name):
    def mutate(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        return name
    return mutate


def metadata(value):
    def mutate(folder):
        _rewrite(folder / "model.safetensors", quantization_method=value)
        return "model.safetensors"
    return mutate


def fewer_scales(folder):
    def drop_one(tensors):
        key = sorted(k for k in tensors if k.endswith(".SCB"))[0]
        tensors[key] = tensors[key][:-1].clone()

    _rewrite(folder / "model.safetensors", drop_one)
    return "model.safetensors"


def qc(**changes):
    return edit_json("config.json", lambda c: c["quantization_config"].update(changes))


def top(key, value):
    return edit_json("config.json", lambda c: c.__setitem__(key, value))


CASES = [
    # config.json
    ("float_folder", write("config.json", "[1, 2]"), "JSON list", REDOWNLOAD),
    ("float_folder", write("config.json", "3"), "JSON number", REDOWNLOAD),
    ("float_folder", write("config.json", b'{"model_type": "Hunyuan\xe9"}'), "not UTF-8", REDOWNLOAD),
    ("float_folder", write("config.json", '{"model_type": '), "not valid JSON", REDOWNLOAD),
    ("float_folder", write("config.json", "\ufeff{}"), "byte-order mark", "without BOM"),
    ("float_folder", make_dir("config.json"), "is a folder", REDOWNLOAD),
    ("float_folder", remove("config.json", named=""), "no config.json", "pick the folder"),
    ("float_folder", top("num_hidden_layers", "two"), "the model's code cannot build the model", REDOWNLOAD),
    ("float_folder", top("hidden_size", -5), "the model's code cannot build the model", REDOWNLOAD),
    ("float_folder", write("modeling_hunyuan3_fake.py", "def broken(:\n"), "SyntaxError", REDOWNLOAD),
    ("float_folder", top("auto_map", ["modeling_hunyuan3_fake.X"]), "auto_map must map", REDOWNLOAD),
    ("float_folder", top("auto_map", {"AutoModelForCausalLM": "owner/repo--modeling_x.Model"}), "another repository",
     "put that repository's *.py files"),
    ("float_folder", remove("modeling_hunyuan3_fake.py", named="config.json"), "modeling_hunyuan3_fake.py, which is "
     "not in the folder", "copy the model's *.py files"),
    # generation_config.json (generate_image reads it)
    ("float_folder", remove("generation_config.json", named=""), "no generation_config.json", "copy generation_config"),
    ("float_folder", write("generation_config.json", "[]"), "JSON list", REDOWNLOAD),
    ("float_folder", write("generation_config.json", "{bot_task: image}"), "not valid JSON", REDOWNLOAD),
    ("float_folder", make_dir("generation_config.json"), "is a folder", REDOWNLOAD),
    # the weights and the tokenizer's JSON
    ("float_folder", remove("model.safetensors", named=""), "weights are missing", "download them"),
    ("float_folder", truncate("model.safetensors"), "not a readable safetensors file", REDOWNLOAD),
    ("float_folder", write("tokenizer_config.json", '{"model_max_length": 1'), "not valid JSON", REDOWNLOAD),
    # the shard index
    ("sharded_folder", write(INDEX, "{"), "not valid JSON", REDOWNLOAD),
    ("sharded_folder", write(INDEX, '["model-00001-of-00002.safetensors"]'), "JSON list", REDOWNLOAD),
    ("sharded_folder", write(INDEX, '{"metadata": {}}'), "no weight_map", REDOWNLOAD),
    ("sharded_folder", remove(SHARDS[1], named=INDEX), f"1 shard file(s) that are not in the folder ({SHARDS[1]})",
     "download the missing files"),
    ("sharded_folder", edit_json(INDEX, lambda i: i["weight_map"].__setitem__("x.weight", "../float/model.safetensors")),
     "outside the folder", REDOWNLOAD),
    ("sharded_folder", truncate(SHARDS[0]), "not a readable safetensors file", REDOWNLOAD),
    # a pre-quantized folder whose metadata lies
    ("int8_folder", metadata("gptq\n" + "A" * 5000), "unknown quantization_method 'gptq\\n", RESAVE),
    ("int8_folder", metadata("bitsandbytes_nf4"), "contradict each other", RESAVE),
    ("int8_folder", top("quantization_method", ["bitsandbytes_int8"]), "unknown quantization_method", RESAVE),
    ("int8_folder", top("quantization_config", "int8"), "quantization_config must be an object", RESAVE),
    ("int8_folder", qc(quant_method="gptq"), "not bitsandbytes'", RESAVE),
    ("int8_folder", qc(load_in_8bit=False, _load_in_8bit=False, load_in_4bit=True, _load_in_4bit=True),
     "load_in_4bit=True", RESAVE),
    ("int8_folder", qc(llm_int8_skip_modules="vae"), "must be a list of module names", RESAVE),
    ("int8_folder", fewer_scales, "the model's code needs int8", RESAVE),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("base, mutate, problem, advice", CASES,
                         ids=[f"{c[0].split('_')[0]}-{i}-{c[2][:24]}" for i, c in enumerate(CASES)])
def test_a_bad_file_is_refused_before_loading_with_one_line_naming_it(base, mutate, problem, advice, request,
                                                                        tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(base), folder)
    named = folder / mutate(folder)
    before = _snapshot(folder)
    monkeypatch.setattr(hf_loader, "_from_pretrained_tracked", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(LoaderError) as info:
        load_hf_model(folder, "int8", int8_engine="bitsandbytes", trust_remote_code=True)
    message = str(info.value)
    assert str(named) in message and problem in message and advice in message, message
    assert "\n" not in message and len(message) < 600, message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert _snapshot(folder) == before


@pytest.mark.parametrize("base", ["sharded_folder", "int8_folder"])
def test_good_sharded_and_prequantized_folders_still_load(base, request):
    loaded = load_hf_model(request.getfixturevalue(base), "int8", trust_remote_code=True)
    assert loaded.dtype_report.quantized


def test_save_quantized_never_writes_over_its_input_or_into_a_file(float_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(float_folder, copy)
    loaded = load_hf_model(copy, "int8", int8_engine="bitsandbytes", trust_remote_code=True)
    before = _snapshot(copy)
    with pytest.raises(LoaderError, match="never writes over its input"):
        save_quantized(loaded, copy, overwrite=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(LoaderError, match="is a file"):
        save_quantized(loaded, tmp_path / "a_file", overwrite=True)
    assert _snapshot(copy) == before
