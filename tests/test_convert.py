"""The streaming converter: decisions, numbers in the report, folders, atomic writes, bad input via the CLI."""

import json
import math
import os
import shutil
import threading
import time

import psutil
import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.kernels.int8 import (
    dequantize_weight,
    quantize_weight,
    relative_error,
)
from comfyui_headroom.quant import convert as convert_mod
from comfyui_headroom.quant.convert import (
    ConvertError,
    convert_file,
    convert_folder,
    looks_like_embedding,
)
from comfyui_headroom.quant.formats import detect_format, parse_int8_layer
from comfyui_headroom.quant.safetensors_stream import (
    StreamingWriter,
    TensorInfo,
    TensorReader,
    read_header,
)
from safetensors.torch import load_file, save_file
from testutil import cli_error


def _dit_state_dict(gen, blocks=2, dim=1024, dtype=torch.bfloat16):
    """Names and shapes of a small DiT (Wan / HunyuanImage style), random weights."""
    sd = {
        "patch_embedding.weight": torch.randn(dim, 16, 1, 2, 2, generator=gen),
        "text_embedding.0.weight": torch.randn(dim, 2 * dim, generator=gen) * 0.02,
        "pos_embed": torch.randn(1, 64, dim, generator=gen),
        "wte.weight": torch.randn(2 * dim, dim, generator=gen),
        "final_layer.linear.weight": torch.randn(64, dim, generator=gen),
        "head.head.weight": torch.randn(dim, dim, generator=gen) * 0.02,
    }
    for i in range(blocks):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = torch.ones(dim)
        sd[p + "self_attn.qkv.weight"] = torch.randn(3 * dim, dim, generator=gen) * 0.02
        sd[p + "self_attn.qkv.bias"] = torch.randn(3 * dim, generator=gen) * 0.02
        sd[p + "self_attn.o.weight"] = torch.randn(dim, dim, generator=gen) * 0.02
        sd[p + "ffn.0.weight"] = torch.randn(2 * dim, dim, generator=gen) * 0.02
        sd[p + "ffn.2.weight"] = torch.randn(dim, 2 * dim, generator=gen) * 0.02
        sd[p + "modulation"] = torch.randn(1, 6, dim, generator=gen)
    return {k: v.to(dtype) for k, v in sd.items()}


QUANTIZED_PER_BLOCK = ("self_attn.qkv", "self_attn.o", "ffn.0", "ffn.2")


@pytest.fixture
def dit_file(tmp_path, gen):
    sd = _dit_state_dict(gen)
    path = tmp_path / "dit.safetensors"
    save_file(sd, str(path), metadata={"modelspec.title": "tiny dit"})
    return path, sd


@pytest.mark.parametrize("method", ["rowwise", "block", "tensorwise"])
def test_report_numbers_and_bit_identical_chunks(tmp_path, dit_file, monkeypatch, method):
    src, sd = dit_file
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 700_000)  # several chunks per weight
    dst = tmp_path / "out.safetensors"
    report = convert_file(src, dst, method=method, progress=False)
    out = load_file(str(dst))
    expected = sorted(f"blocks.{i}.{n}" for i in range(2) for n in QUANTIZED_PER_BLOCK) + ["head.head"]
    assert sorted(report.quantized) == expected
    errors = {}
    for layer in expected:
        q, scale = quantize_weight(sd[layer + ".weight"], method)
        assert torch.equal(out[layer + ".weight"], q), layer
        assert torch.equal(out[layer + ".weight_scale"], scale), layer
        errors[layer] = relative_error(dequantize_weight(q, scale), sd[layer + ".weight"].float())
        assert report.quantized[layer] == pytest.approx(errors[layer], rel=1e-4)  # float32 norms
    worst = max(errors, key=errors.get)
    assert report.worst_error == pytest.approx(errors[worst], rel=1e-4)
    assert report.worst_error == pytest.approx(max(report.quantized.values()))
    assert report.bytes_before == src.stat().st_size and report.bytes_after == dst.stat().st_size
    assert report.reduction_pct == pytest.approx(100 * (1 - dst.stat().st_size / src.stat().st_size))
    assert report.reduction_pct > 30
    assert report.kept == {"text_embedding.0": "embedding-like name", "wte": "embedding-like name",
                           "final_layer.linear": "pattern 'final_layer'"}
    for key in ("patch_embedding.weight", "pos_embed", "wte.weight", "blocks.0.norm1.weight",
                "blocks.0.self_attn.qkv.bias", "blocks.1.modulation", "text_embedding.0.weight"):
        assert torch.equal(out[key], sd[key]), key  # copied bit for bit, dtype kept
    text = str(report)
    assert "9 quantized to INT8, 3 kept in float" in text and report.worst_layer in text


def test_skip_options(tmp_path, dit_file):
    src, _ = dit_file
    report = convert_file(src, tmp_path / "a.safetensors", skip=["self_attn", "ffn.2$"], progress=False)
    assert sorted(report.quantized) == ["blocks.0.ffn.0", "blocks.1.ffn.0", "head.head"]
    assert report.kept["blocks.0.self_attn.qkv"] == "pattern 'self_attn'"
    report = convert_file(src, tmp_path / "b.safetensors", keep_default_skips=False, progress=False)
    assert "final_layer.linear" not in report.quantized  # still kept: 64 outputs < 1024 (shape rule)
    assert "wte" in report.kept  # embedding-like names are never Linear weights


def test_embedding_like_names():
    for name in ("wte", "model.embed_tokens", "pos_embed", "tok_embeddings", "time_embedding.0",
                 "txt_norm.position_embeddings", "wpe"):
        assert looks_like_embedding(name), name
    for name in ("blocks.0.self_attn.qkv", "proj_out", "blocks.0.post_attention.proj", "img_mod.lin", "ffn.0"):
        assert not looks_like_embedding(name), name


def test_fp8_input_is_dequantized_then_quantized(tmp_path, gen):
    w = torch.randn(2048, 1024, generator=gen)
    row_scale = torch.rand(2048, 1, generator=gen) + 0.5
    small = torch.randn(64, 1024, generator=gen)
    sd = {
        "a.weight": w.to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(0.25), "a.scale_input": torch.tensor(1.0),
        "b.weight": w.to(torch.float8_e4m3fn), "b.weight_scale": row_scale,
        "small.weight": small.to(torch.float8_e4m3fn), "small.weight_scale": torch.tensor(2.0),
        "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
    }
    src = tmp_path / "fp8.safetensors"
    save_file(sd, str(src))
    assert len(detect_format(src).fp8_layers) == 3
    report = convert_file(src, tmp_path / "out.safetensors", progress=False)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(out) == ["a.weight", "a.weight_scale", "b.weight", "b.weight_scale", "small.weight"]
    assert set(report.dropped_keys) == {"scaled_fp8", "a.scale_weight", "a.scale_input", "b.weight_scale",
                                        "small.weight_scale"}
    q, s = quantize_weight(sd["a.weight"].float() * 0.25, "rowwise")
    assert torch.equal(out["a.weight"], q) and torch.equal(out["a.weight_scale"], s)
    q, s = quantize_weight(sd["b.weight"].float() * row_scale, "rowwise")
    assert torch.equal(out["b.weight"], q) and torch.equal(out["b.weight_scale"], s)
    assert out["small.weight"].dtype == torch.bfloat16  # kept layer: dequantized to bf16
    assert torch.equal(out["small.weight"], (sd["small.weight"].float() * 2.0).to(torch.bfloat16))


def test_comfy_layout_refuses_block(tmp_path, dit_file):
    with pytest.raises(ConvertError, match="cannot express block scales"):
        convert_file(dit_file[0], tmp_path / "x.safetensors", method="block", layout="comfy", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def _write_sharded(folder, gen):
    sd = _dit_state_dict(gen, blocks=2)
    names = sorted(sd)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    transformer = folder / "transformer"
    transformer.mkdir(parents=True)
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(transformer / shard))
        weight_map.update({k: shard for k in keys})
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (transformer / "config.json").write_text('{"_class_name": "TinyDiT"}')
    vae = folder / "vae"
    vae.mkdir()
    save_file({"decoder.mid.attn.to_q.weight": torch.randn(1024, 1024, generator=gen)}, str(vae / "model.safetensors"))
    (folder / "model_index.json").write_text("{}")
    (transformer / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pickle twin")  # never copied
    return sd


def test_sharded_folder(tmp_path, gen):
    src = tmp_path / "pipeline"
    sd = _write_sharded(src, gen)
    dst = tmp_path / "pipeline-int8"
    report = convert_folder(src, dst, progress=False)
    assert report.files == 3 and len(report.quantized) == 9
    assert report.kept["decoder.mid.attn.to_q"] == "pattern 'vae'"  # the folder name joins the decision
    assert (dst / "transformer" / "config.json").read_text() == '{"_class_name": "TinyDiT"}'
    assert (dst / "model_index.json").exists()
    assert report.skipped_files == ["transformer/diffusion_pytorch_model.bin"]
    assert not (dst / "transformer" / "diffusion_pytorch_model.bin").exists()
    index = json.loads((dst / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    total = 0
    for shard in set(index["weight_map"].values()):
        header = read_header(dst / "transformer" / shard)
        total += header.data_bytes
        assert set(header.tensors) == {k for k, v in index["weight_map"].items() if v == shard}
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"]["blocks.0.ffn.0.weight_scale"] == index["weight_map"]["blocks.0.ffn.0.weight"]
    assert set(index["weight_map"]) == set(sd) | {f"blocks.{i}.{n}.weight_scale" for i in range(2)
                                                  for n in QUANTIZED_PER_BLOCK} | {"head.head.weight_scale"}
    info = detect_format(dst)
    assert info.format == "headroom" and len(info.quantized_layers) == 9


def _leftovers(folder, *names):
    return sorted(p.name for p in folder.iterdir() if p.name not in names)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(tmp_path, dit_file, monkeypatch, failure):
    src, _ = dit_file
    dst = tmp_path / "out.safetensors"
    calls = {"n": 0}
    real = convert_mod.quantize_streamed

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-write: the header and a few tensors are already on disk
            raise failure("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "quantize_streamed", failing)
    with pytest.raises(failure):
        convert_file(src, dst, progress=False)
    assert calls["n"] == 3
    assert _leftovers(tmp_path, src.name) == []


def test_folder_output_never_swallows_the_input(tmp_path, gen):
    src = tmp_path / "models" / "pipeline"
    _write_sharded(src, gen)
    with pytest.raises(ConvertError, match="contains the input"):
        convert_folder(src, tmp_path / "models", progress=False, overwrite=True)
    with pytest.raises(ConvertError, match="inside the input folder"):
        convert_folder(src, src / "int8", progress=False)
    assert (src / "transformer" / "config.json").exists()


def test_failure_hook_in_folder_leaves_nothing(tmp_path, gen):
    src = tmp_path / "pipeline"
    _write_sharded(src, gen)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert_folder(src, tmp_path / "out", progress=False, _fail_after=4)
    assert _leftovers(tmp_path, "pipeline") == []


def test_never_overwrites_input_and_respects_existing_output(tmp_path, dit_file):
    src, _ = dit_file
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    for target in (src, link, tmp_path / "." / src.name):
        with pytest.raises(ConvertError, match="is the input itself"):
            convert_file(src, target, progress=False, overwrite=True)
    before = src.read_bytes()
    dst = tmp_path / "out.safetensors"
    dst.write_text("keep me")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_file(src, dst, progress=False)
    assert dst.read_text() == "keep me"
    convert_file(src, dst, progress=False, overwrite=True)
    assert detect_format(dst).format == "headroom"
    assert src.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# Bad input through the real CLI: exit code 2, one line that says what is wrong
# ---------------------------------------------------------------------------------------------------------

_cli_error = cli_error


def test_cli_bad_inputs(tmp_path, capsys, dit_file):
    src, sd = dit_file
    out = str(tmp_path / "o.safetensors")
    assert "does not exist" in _cli_error(capsys, "convert", str(tmp_path / "nope.safetensors"), out)
    if os.path.exists("/dev/null"):
        assert "is not a file" in _cli_error(capsys, "convert", "/dev/null", out)
    folder = tmp_path / "empty"
    folder.mkdir()
    assert "without any .safetensors" in _cli_error(capsys, "convert", str(folder), str(tmp_path / "o"))

    pickle = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, pickle)
    err = _cli_error(capsys, "convert", str(pickle), out)
    assert "refuses pickles for safety" in err and "save_file" in err
    raw = tmp_path / "model.bin"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a raw pickle stream
    assert "pickle" in _cli_error(capsys, "convert", str(raw), out)

    data = src.read_bytes()
    for name, blob in (("truncated.safetensors", data[: len(data) // 2]), ("header.safetensors", data[:5]),
                       ("text.safetensors", b"{not: json}" * 10)):
        (tmp_path / name).write_bytes(blob)
        err = _cli_error(capsys, "convert", str(tmp_path / name), out)
        assert name in err and "truncated or corrupt header" in err

    bad = dict(sd)
    bad["blocks.1.ffn.2.weight"] = bad["blocks.1.ffn.2.weight"].clone()
    bad["blocks.1.ffn.2.weight"][5, 7] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    err = _cli_error(capsys, "convert", str(tmp_path / "nan.safetensors"), out)
    assert "'blocks.1.ffn.2.weight' contains NaN" in err
    bad = {"blocks.0.norm1.weight": torch.tensor([1.0, float("inf")])}
    save_file(bad, str(tmp_path / "inf.safetensors"))
    assert "'blocks.0.norm1.weight' contains inf" in _cli_error(capsys, "convert", str(tmp_path / "inf.safetensors"), out)
    assert not os.path.exists(out)

    assert cli.main(["convert", str(src), out, "--quiet"]) == 0
    capsys.readouterr()
    err = _cli_error(capsys, "convert", out, str(tmp_path / "again.safetensors"))
    assert "already quantized" in err and "headroom inspect" in err
    packed = {"blocks.0.ffn.0.weight": torch.zeros(2048, 512, dtype=torch.uint8), "blocks.0.ffn.0.weight_scale":
              torch.ones(2048, 64, dtype=torch.uint8), "blocks.0.ffn.0.comfy_quant": torch.tensor([123, 125], dtype=torch.uint8)}
    save_file(packed, str(tmp_path / "nvfp4.safetensors"))
    err = _cli_error(capsys, "convert", str(tmp_path / "nvfp4.safetensors"), str(tmp_path / "x.safetensors"))
    assert "already quantized ('blocks.0.ffn.0.weight' is uint8" in err
    assert "is the input itself" in _cli_error(capsys, "convert", str(src), str(src))
    assert "--overwrite" in _cli_error(capsys, "convert", str(src), out)
    assert "block" in _cli_error(capsys, "convert", str(src), str(tmp_path / "c.safetensors"), "--method", "block",
                                 "--layout", "comfy")
    assert _leftovers(tmp_path, "o.safetensors") == sorted(
        p.name for p in tmp_path.iterdir() if p.name != "o.safetensors")  # no temporaries anywhere
    assert not any(".headroom-tmp-" in p.name for p in tmp_path.iterdir())


def test_cli_convert_json_report_and_default_output(tmp_path, capsys, dit_file):
    src, _ = dit_file
    assert cli.main(["convert", str(src), "--json", "--skip", "ffn"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dst"] == str(tmp_path / "dit-int8-rowwise.safetensors")
    assert report["layers_quantized"] == 5 and report["worst_layer"] in report["quantized"]
    assert report["bytes_after"] == os.path.getsize(report["dst"])
    (tmp_path / "converted").mkdir()
    assert cli.main(["convert", str(src), str(tmp_path / "converted"), "--quiet", "--layout", "comfy"]) == 0
    assert detect_format(tmp_path / "converted" / "dit-int8-comfy.safetensors").format == "comfy"


# ---------------------------------------------------------------------------------------------------------
# Streaming: a 3 GB file converts with RSS bounded by the largest tensor + 1.5 GB
# ---------------------------------------------------------------------------------------------------------

BIG_ROWS, BIG_COLS, BIG_TENSORS, BIG_QUANTIZED = 8192, 8192, 24, 2


def _write_big_checkpoint(path):
    """~3 GiB of bf16 written tensor by tensor with our streaming writer (never the whole model in RAM)."""
    names = [f"blocks.{i}.ffn.weight" if i < BIG_QUANTIZED else f"blocks.{i}.final_layer.weight"
             for i in range(BIG_TENSORS)]
    plan = {n: TensorInfo(torch.bfloat16, (BIG_ROWS, BIG_COLS)) for n in names}
    base = torch.randn(BIG_ROWS, BIG_COLS, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    writer = StreamingWriter(path, plan)
    for i, name in enumerate(names):
        base[0, 0] = float(i)  # each tensor differs a little
        writer.write(name, base)
    writer.close(sync=False)  # test input: no need to wait for the disk
    return names, base.numel() * 2


class _PeakRss:
    """Samples this process's RSS in a thread (torch ops release the GIL, so it keeps sampling)."""

    def __init__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self.baseline = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_streaming_rss_stays_bounded_on_a_3gb_file(tmp_path):
    """IO bound (~6 GB through the disk); RSS growth must stay under the largest tensor + 1.5 GiB.

    Without streaming (or with safe_open kept open, whose memory-mapped pages stay in RSS) it would
    grow by the whole 3 GiB.
    """
    src, dst = tmp_path / "big.safetensors", tmp_path / "big-int8.safetensors"
    needed = 2 * BIG_TENSORS * BIG_ROWS * BIG_COLS * 2 + 2**30  # source + mostly-bf16 output + 1 GiB spare
    free = shutil.disk_usage(tmp_path).free
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free under {tmp_path.parent}, has {free / 2**30:.1f} GiB")
    try:
        names, largest = _write_big_checkpoint(src)
        assert src.stat().st_size > 3 * 10**9
        with _PeakRss() as rss:
            report = convert_file(src, dst, progress=False)
        growth = rss.peak - rss.baseline
        bound = largest + int(1.5 * 2**30)
        assert 0 < growth < bound, f"RSS grew {growth / 2**30:.2f} GiB, over the bound {bound / 2**30:.2f} GiB"
        assert len(report.quantized) == BIG_QUANTIZED and report.bytes_after == dst.stat().st_size
        with TensorReader(dst) as f:
            assert sorted(f) == sorted(names + [f"blocks.{i}.ffn.weight_scale" for i in range(BIG_QUANTIZED)])
            parsed = parse_int8_layer(f, f"blocks.{BIG_QUANTIZED - 1}.ffn.", f.header.metadata)
            original = torch.randn(BIG_ROWS, BIG_COLS, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
            original[0, 0] = float(BIG_QUANTIZED - 1)
            q, s = quantize_weight(original[:256], "rowwise")
            assert torch.equal(parsed.weight[:256], q) and torch.equal(parsed.scale[:256], s)
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


class _ModelSource(dict):
    """A model's state dict as a converter source: ``infos`` up front, each tensor asked for once."""

    def __init__(self, module):
        super().__init__(module.state_dict())
        self.infos = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self.items()}
        self.name, self.requests = "TinyBlock", []

    def __getitem__(self, key):
        self.requests.append(key)
        return super().__getitem__(key)


def test_convert_source_from_a_module(tmp_path, gen):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.LayerNorm(2048), torch.nn.Linear(2048, 1024))
    source = _ModelSource(module)
    report = convert_mod.convert_source(source, tmp_path / "m.safetensors", method="block")
    assert sorted(source.requests) == sorted(source.infos)  # each tensor computed exactly once
    assert sorted(report.quantized) == ["0", "2"]
    with TensorReader(tmp_path / "m.safetensors") as f:
        assert f.header.metadata["headroom.source_file"] == "TinyBlock"
        assert "headroom.source_sha256_of_header_and_size" not in f.header.metadata
        parsed = parse_int8_layer(f, "2.", f.header.metadata)
        q, s = quantize_weight(module[2].weight.detach(), "block")
        assert torch.equal(parsed.weight, q) and torch.equal(parsed.scale, s)
        assert torch.equal(f["1.weight"], module[1].weight.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (--device cuda)")
@pytest.mark.parametrize("method", ["rowwise", "block", "tensorwise"])
def test_cuda_device_gives_the_same_file(tmp_path, dit_file, method):
    src, _ = dit_file
    cpu = convert_file(src, tmp_path / "cpu.safetensors", method=method, progress=False)
    gpu = convert_file(src, tmp_path / "gpu.safetensors", method=method, device="cuda", progress=False)
    a, b = load_file(str(tmp_path / "cpu.safetensors")), load_file(str(tmp_path / "gpu.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert gpu.quantized.keys() == cpu.quantized.keys()


def test_the_error_of_a_large_but_finite_weight_is_a_number():
    """Its squares overflow float32: the converter's report used to say "worst relative error nan%"."""
    from comfyui_headroom.quant.chunked import quantize_streamed

    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 1e30
    _, _, error = quantize_streamed(weight, "rowwise", 128, "big")
    assert math.isfinite(error) and 0 < error < 0.05
