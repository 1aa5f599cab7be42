"""A HunyuanImage-3 model folder's files, read before a weight is loaded: every file a user supplies (config.json,
generation_config.json, the shard index, the tokenizer's JSON, the safetensors headers and their metadata) is
checked here, and a bad one is refused with a :class:`LoaderError` that names the file and what to do - not a
traceback from the middle of ``from_pretrained``. Nothing here writes to the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .inputs import LoaderError, first_line, shown

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # transformers' fallback: not inspected
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
MAX_JSON_BYTES = 256 * 2**20  # a real tokenizer.json is ~30 MB, an 80 B model's index a few MB

QUANTIZATION_METHODS = {
    "bitsandbytes_int8_full": "int8",  # every Linear INT8 on disk; critical layers dequantized on load
    "bitsandbytes_int8": "int8",  # selective: critical layers stored in bf16 on disk
    "bitsandbytes_nf4": "nf4",
}
REDOWNLOAD = "re-download it from the model's release"
RESAVE = "re-save the folder with save_quantized, or load the float original"
# auto_map entries: "module.Class", or "owner/repo--module.Class" (code from another repository)
_CLASS_REF = re.compile(r"(?:(?P<repo>[^\s]+)--)?(?P<module>[A-Za-z_]\w*)\.[A-Za-z_]\w*")


def read_json_object(path: Path, fix: str = REDOWNLOAD) -> dict | None:
    """The JSON object in ``path``; None when there is no such file. Anything else (a folder, unreadable, not
    UTF-8, not JSON, a list or a number) raises :class:`LoaderError` naming the file and ``fix``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir():
        raise LoaderError(f"{path} is a folder, not a file; {fix}")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise LoaderError(f"{path}: {path.stat().st_size / 2**20:.0f} MB is far too large for this file; {fix}")
        raw = path.read_bytes()
    except OSError as err:
        raise LoaderError(f"{path}: cannot be read ({err.strerror or first_line(err)}); {fix}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LoaderError(f"{path}: not UTF-8 text (invalid byte at offset {err.start}); {fix}") from None
    if text.startswith("\ufeff"):
        raise LoaderError(f"{path}: starts with a byte-order mark, which transformers cannot read; save it as UTF-8 "
                          f"without BOM, or {fix}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoaderError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}") \
            from None
    except RecursionError:
        raise LoaderError(f"{path}: JSON nested too deeply to be a model file; {fix}") from None
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else "string" if isinstance(data, str) else \
            "null" if data is None else "true/false" if isinstance(data, bool) else "number"
        raise LoaderError(f"{path}: holds a JSON {kind} ({shown(data, 40)}), not an object {{...}}; {fix}")
    return data


# ------------------------------------------------------------------------------ config.json and its code


def check_model_folder(path, trust_remote_code: bool) -> dict:
    """The folder's config.json; refuses anything but a local folder, remote code without consent, and an
    ``auto_map`` whose Python files are not in the folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoaderError(f"{path}: not a local folder. Download the model first (e.g. `hf download ... "
                          "--local-dir <ComfyUI>/models/hunyuan3/<name>`) and pick that folder")
    config = read_json_object(folder / CONFIG)
    if config is None:
        raise LoaderError(f"{folder}: no {CONFIG} - not a transformers model folder; pick the folder that holds "
                          f"{CONFIG} and the safetensors files")
    modules = remote_code_modules(folder, config.get("auto_map"))
    if modules and not trust_remote_code:
        raise LoaderError(f"{folder} ships its own Python code ({modules[0]}.py); loading it runs that code. Turn on "
                          "trust_remote_code only for folders from a source you trust")
    for module in modules:
        if not (folder / f"{module}.py").is_file():
            raise LoaderError(f"{folder / CONFIG}: auto_map names {module}.py, which is not in the folder; copy the "
                              "model's *.py files into it (or re-download the model)")
    return config


def remote_code_modules(folder: Path, auto_map: Any) -> list[str]:
    """The local modules ``auto_map`` names (``"modeling_x.Class"`` -> ``modeling_x``), in order, once each."""
    if auto_map is None:
        return []
    where = folder / CONFIG
    refs = []
    if isinstance(auto_map, dict):
        for value in auto_map.values():
            refs.extend(value if isinstance(value, list) else [value])
    if not isinstance(auto_map, dict) or not all(r is None or isinstance(r, str) for r in refs):
        raise LoaderError(f"{where}: auto_map must map class names to 'module.Class' strings, got "
                          f"{shown(auto_map)}; {REDOWNLOAD}")
    modules: list[str] = []
    for ref in filter(None, refs):
        match = _CLASS_REF.fullmatch(ref)
        if match is None:
            raise LoaderError(f"{where}: auto_map entry {shown(ref)} is not 'module.Class'; {REDOWNLOAD}")
        if match["repo"]:
            raise LoaderError(f"{where}: auto_map entry {shown(ref)} fetches code from another repository; only "
                              "local code is loaded: put that repository's *.py files in the folder and write "
                              f"{shown(ref.split('--', 1)[1])}")
        if match["module"] not in modules:
            modules.append(match["module"])
    return modules


def check_generation_config(folder: Path, required: bool) -> dict:
    """generation_config.json as a dict ({} when absent and not ``required``). HunyuanImage-3's
    ``generate_image`` reads its custom fields, so a model with ``generate_image`` needs the file."""
    data = read_json_object(Path(folder) / GENERATION_CONFIG)
    if data is None and required:
        raise LoaderError(f"{folder}: no {GENERATION_CONFIG}; HunyuanImage-3's generate_image reads its fields "
                          f"(bot_task, diff_infer_steps, ...): copy {GENERATION_CONFIG} from the model's release "
                          "into the folder")
    return data or {}


def check_tokenizer_files(folder: Path) -> None:
    for name in TOKENIZER_JSON:
        read_json_object(Path(folder) / name)


# ------------------------------------------------------------------------------ weights


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers will read: the shards the index names (each must be a plain file of
    the folder) or ``model.safetensors``; each one's header must open. [] for a folder of torch ``.bin``
    weights (transformers reads those itself)."""
    folder = Path(folder)
    index_path = folder / INDEX
    index = read_json_object(index_path)
    if index is not None:
        files = _index_shards(folder, index_path, index)
    elif (folder / SINGLE_FILE).exists():
        files = [folder / SINGLE_FILE]
    elif any((folder / name).is_file() for name in TORCH_WEIGHTS):
        return []
    else:
        raise LoaderError(f"{folder}: no {SINGLE_FILE} or {INDEX} - the weights are missing; download them into "
                          "this folder")
    for file in files:
        safetensors_keys(file)  # the header opens (truncated and corrupt files fail here, named)
    return files


def _index_shards(folder: Path, index_path: Path, index: dict) -> list[Path]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise LoaderError(f"{index_path}: no weight_map of tensor name -> shard file; {REDOWNLOAD}")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if s in ("", ".", "..") or Path(s).name != s or "\\" in s]
    if outside:
        raise LoaderError(f"{index_path}: names shard files outside the folder ({shown(outside[0])}); {REDOWNLOAD}")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise LoaderError(f"{index_path} names {len(missing)} shard file(s) that are not in the folder "
                          f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): the download is "
                          "incomplete - download the missing files")
    return [folder / s for s in shards]


def safetensors_keys(file: Path) -> list[str]:
    """The tensor names in ``file``'s header; a file that does not open raises :class:`LoaderError`."""
    return _read_header(file, lambda f: list(f.keys()))


def safetensors_metadata(file: Path) -> dict:
    return _read_header(file, lambda f: dict(f.metadata() or {}))


def _read_header(file: Path, read):
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return read(f)
    except Exception as err:  # noqa: BLE001 - SafetensorError (a plain Exception), OSError: a bad file either way
        raise LoaderError(f"{file}: not a readable safetensors file ({first_line(err)}); {REDOWNLOAD}") from None


# ------------------------------------------------------------------------------ pre-quantized folders


def detect_quantization_method(folder, config: dict | None = None, files: Sequence[Path] | None = None) -> str | None:
    """``quantization_method`` from config.json (top level or inside ``quantization_config``) or the safetensors
    metadata; for a bitsandbytes folder without it, INT8 vs NF4 from ``quantization_config``. What the folder
    says must agree with itself and be a bitsandbytes config transformers can load; else :class:`LoaderError`."""
    folder = Path(folder)
    where = folder / CONFIG
    config = config if config is not None else (read_json_object(where) or {})
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise LoaderError(f"{where}: quantization_config must be an object, got {shown(qc)}; {RESAVE}")
    qc = qc or {}
    files = list(files) if files is not None else weight_files(folder)
    said = {f"{where} (quantization_method)": config.get("quantization_method"),
            f"{where} (quantization_config.quantization_method)": qc.get("quantization_method")}
    if files:
        said[f"{files[0]} (metadata)"] = safetensors_metadata(files[0]).get("quantization_method")
    said = {k: v for k, v in said.items() if v is not None}
    for source, value in said.items():
        if not isinstance(value, str) or value not in QUANTIZATION_METHODS:
            raise LoaderError(f"{source}: unknown quantization_method {shown(value)}; known: "
                              f"{', '.join(QUANTIZATION_METHODS)} - {RESAVE}")
    if len(set(said.values())) > 1:
        raise LoaderError(f"{folder}: its files contradict each other: "
                          + ", ".join(f"{k} says {v}" for k, v in said.items()) + f"; {RESAVE}")
    method = next(iter(said.values()), None)
    if method is None and qc.get("quant_method") == "bitsandbytes":
        method = "bitsandbytes_nf4" if qc.get("load_in_4bit") is True else "bitsandbytes_int8"
    if method is not None:
        _check_bitsandbytes_config(where, qc, method)
    return method


def _check_bitsandbytes_config(where: Path, qc: dict, method: str) -> None:
    """A pre-quantized folder needs the bitsandbytes ``quantization_config`` transformers reads the weights
    with, in the same mode as ``method``, and a skip list that is a list of module names."""
    if qc.get("quant_method") != "bitsandbytes":
        raise LoaderError(f"{where}: says {method} but its quantization_config is not bitsandbytes' (quant_method "
                          f"{shown(qc.get('quant_method'))}); {RESAVE}")
    four_bit = QUANTIZATION_METHODS[method] == "nf4"
    flags = {k: qc.get(k, qc.get("_" + k)) for k in ("load_in_4bit", "load_in_8bit")}
    if (flags["load_in_4bit"] is True) != four_bit or (flags["load_in_8bit"] is True) == four_bit:
        raise LoaderError(f"{where}: says {method} but quantization_config has load_in_4bit="
                          f"{shown(flags['load_in_4bit'])}, load_in_8bit={shown(flags['load_in_8bit'])}; {RESAVE}")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise LoaderError(f"{where}: quantization_config.llm_int8_skip_modules must be a list of module names, got "
                          f"{shown(skip)}; {RESAVE}")


def int8_layers_on_disk(files: Sequence[Path]) -> dict[str, tuple[Path, list[int], str, list[int]]]:
    """Layers stored as LLM.int8 (an int8 ``weight`` next to an ``SCB`` scale), from the headers alone:
    name -> (file, weight shape, weight dtype, SCB shape)."""
    def pairs(f) -> dict:
        keys = set(f.keys())
        found = {}
        for key in keys:
            if key.endswith(".SCB") and key[:-4] + ".weight" in keys:
                weight = f.get_slice(key[:-4] + ".weight")
                found[key[:-4]] = (weight.get_shape(), weight.get_dtype(), f.get_slice(key).get_shape())
        return found

    found = {}
    for file in files:
        found.update({name: (file, *info) for name, info in _read_header(file, pairs).items()})
    return found


def check_int8_shapes(on_disk: Mapping[str, tuple], weight_shapes: Mapping[str, Sequence[int]]) -> None:
    """Every INT8 layer on disk that the model has must be int8 ``[out, in]`` with ``[out]`` scales, as the
    model's code declares it; else the folder belongs to other code (or was tampered with)."""
    for name, (file, shape, dtype, scb_shape) in on_disk.items():
        want = list(weight_shapes.get(name, ()))
        if want and (dtype != "I8" or list(shape) != want or list(scb_shape) != want[:1]):
            raise LoaderError(f"{file}: {name} is stored as {dtype} {shown(shape, 40)} with scales "
                              f"{shown(scb_shape, 40)}, but the model's code needs int8 {want} with scales "
                              f"[{want[0]}]; the folder does not belong to this model - {RESAVE}")
