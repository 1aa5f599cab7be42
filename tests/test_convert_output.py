"""Writing OUT: OS errors as one line, nothing half-written, nothing left behind (quant/atomic.py).

Each bad case is built here and goes through the real CLI (exit 2, one line) or the library; after each, the folder
holds exactly what it held before. Real kernels errors where this machine can make them: a read-only and a full
file system (tmpfs in a private mount namespace: needs root, skipped otherwise), a file-size limit (EFBIG), a
conversion killed by SIGTERM / SIGHUP / SIGKILL in a subprocess.
"""

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from comfyui_headroom import cli
from comfyui_headroom.quant import atomic
from comfyui_headroom.quant import convert as convert_mod
from comfyui_headroom.quant.atomic import OutputError, side_path
from comfyui_headroom.quant.convert import ConvertError, convert_file, convert_folder
from comfyui_headroom.quant.formats import detect_format
from comfyui_headroom.quant.safetensors_stream import StreamingWriter
from safetensors.torch import save_file
from testutil import cli_error


def _model(path, gen, layers=4, dim=1024):
    sd = {}
    for i in range(layers):
        sd[f"blocks.{i}.ffn.weight"] = (torch.randn(dim, dim, generator=gen) * 0.02).to(torch.bfloat16)
        sd[f"blocks.{i}.norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    save_file(sd, str(path))
    return path


@pytest.fixture
def src(tmp_path, gen):
    return _model(tmp_path / "m.safetensors", gen)


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli_error(capsys, *argv):
    return cli_error(capsys, "convert", *argv)


def test_a_file_in_the_path_of_out(tmp_path, capsys, src, gen):
    (tmp_path / "file.txt").write_text("not a folder")
    before = _tree(tmp_path)
    for out in ("file.txt/out.safetensors", "file.txt/a/b/out.safetensors"):
        err = _cli_error(capsys, str(src), str(tmp_path / out))
        assert "file.txt is a file, not a folder" in err, err
    folder = tmp_path / "pipeline"
    folder.mkdir()
    _model(folder / "model.safetensors", gen)
    before = _tree(tmp_path)
    assert "file.txt is a file, not a folder" in _cli_error(capsys, str(folder), str(tmp_path / "file.txt" / "int8"))
    assert _tree(tmp_path) == before
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_out_that_is_a_file_where_a_folder_is_meant(tmp_path, capsys, src, gen):
    (tmp_path / "out.txt").write_text("keep")
    before = _tree(tmp_path)
    assert "names a folder, but" in _cli_error(capsys, str(src), str(tmp_path / "out.txt") + "/")
    folder = tmp_path / "pipeline"
    folder.mkdir()
    _model(folder / "model.safetensors", gen)
    before = _tree(tmp_path)
    assert "exists and is a file" in _cli_error(capsys, str(folder), str(tmp_path / "out.txt"), "--overwrite")
    assert _tree(tmp_path) == before and (tmp_path / "out.txt").read_text() == "keep"
    # a trailing slash names a folder: created, and the file lands inside under its default name
    assert cli.main(["convert", str(src), str(tmp_path / "new") + "/", "--quiet"]) == 0
    assert (tmp_path / "new" / "m-int8-rowwise.safetensors").is_file()


def test_out_that_is_not_a_regular_file_is_never_replaced(tmp_path, capsys, src):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    for out in [fifo, dangling] + (["/dev/null"] if os.path.exists("/dev/null") else []):
        err = _cli_error(capsys, str(src), str(out), "--overwrite")
        assert "not a regular file or folder" in err, err
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert dangling.is_symlink() and fifo.exists()

    class Source(dict):  # what the Save INT8 Model node hands convert_source
        infos = {"w": convert_mod.TensorInfo(torch.float32, (4,))}

    with pytest.raises(ConvertError, match="not a regular file or folder"):
        convert_mod.convert_source(Source(w=torch.ones(4)), fifo, overwrite=True)


def test_names_too_long(tmp_path, capsys, src):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    # the longest name the file system takes: the temporary's name is shortened to fit, the conversion works
    longest = tmp_path / ("n" * (limit - len(".safetensors")) + ".safetensors")
    assert cli.main(["convert", str(src), str(longest), "--quiet"]) == 0
    assert detect_format(longest).format == "headroom"
    assert _tree(tmp_path) == sorted(["m.safetensors", longest.name])
    err = _cli_error(capsys, str(src), str(tmp_path / ("n" * (limit + 1) + ".safetensors")))
    assert "name is too long" in err
    err = _cli_error(capsys, str(src), str(tmp_path / ("d" * (limit + 1)) / "out.safetensors"))
    assert "name is too long" in err
    assert _tree(tmp_path) == sorted(["m.safetensors", longest.name])


def test_parent_folders_created_by_a_failed_conversion_are_removed(tmp_path, src, monkeypatch):
    calls = {"n": 0}
    real = convert_mod.quantize_streamed

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "quantize_streamed", failing)
    (tmp_path / "exists").mkdir()
    with pytest.raises(RuntimeError, match="injected"):
        convert_file(src, tmp_path / "exists" / "new" / "deeper" / "out.safetensors", progress=False)
    assert calls["n"] == 2
    assert _tree(tmp_path) == ["exists", "m.safetensors"]  # the folder that was there stays


def _full_disk_writer(monkeypatch, after):
    """StreamingWriter whose writes fail with ENOSPC after ``after`` tensors, and whose close fails again (a full
    disk fails the final flush too): the cleanup must not turn that second failure into the error."""
    real_write = StreamingWriter.write

    class FullFile:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def close(self):
            self.inner.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, name, tensor):
        if self._next >= after:
            self._file = FullFile(self._file) if not isinstance(self._file, FullFile) else self._file
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", write)


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(tmp_path, capsys, src, monkeypatch):
    _full_disk_writer(monkeypatch, after=3)
    before = _tree(tmp_path)
    err = _cli_error(capsys, str(src), str(tmp_path / "new" / "out.safetensors"))
    assert "cannot write" in err and "out.safetensors" in err and "the disk is full" in err
    assert _tree(tmp_path) == before


def test_cleanup_that_fails_never_hides_the_error(tmp_path, src, monkeypatch):
    _full_disk_writer(monkeypatch, after=2)
    real_unlink = type(tmp_path).unlink

    def unlink(self, missing_ok=False):
        if atomic.TEMP_TAG in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(type(tmp_path), "unlink", unlink)
    with pytest.raises(OutputError) as caught:
        convert_file(src, tmp_path / "out.safetensors", progress=False)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "the disk is full" in message
    assert "also could not remove" in message and atomic.TEMP_TAG in message  # says what it left
    monkeypatch.undo()
    (tmp_path / f".out.safetensors.{atomic.TEMP_TAG}-{os.getpid()}").unlink()


@pytest.mark.parametrize("code, advice", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                          (errno.EDQUOT, "quota"), (errno.EIO, "I/O error")])
def test_each_os_error_says_what_to_do(tmp_path, capsys, src, monkeypatch, code, advice):
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self.path))

    monkeypatch.setattr(StreamingWriter, "write", refuse)
    err = _cli_error(capsys, str(src), str(tmp_path / "out.safetensors"))
    assert advice in err and str(tmp_path / "out.safetensors") in err
    assert _tree(tmp_path) == ["m.safetensors"]


def test_free_space_is_checked_before_writing(tmp_path, capsys, src, monkeypatch, gen):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    opened = []
    monkeypatch.setattr(StreamingWriter, "__init__", lambda *a, **k: opened.append(a))
    err = _cli_error(capsys, str(src), str(tmp_path / "sub" / "out.safetensors"))
    assert "needs" in err and "free" in err and not opened
    folder = tmp_path / "pipeline"
    folder.mkdir()
    _model(folder / "model.safetensors", gen)
    assert "needs" in _cli_error(capsys, str(folder), str(tmp_path / "out"))
    assert _tree(tmp_path) == ["m.safetensors", "pipeline", "pipeline/model.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# Real kernel errors: a file-size limit; a full and a read-only tmpfs in a private mount namespace
# ---------------------------------------------------------------------------------------------------------

def _env():
    return dict(os.environ, PYTHONDONTWRITEBYTECODE="1")


def test_file_too_large_for_the_file_system(tmp_path, src):
    """RLIMIT_FSIZE makes the kernel answer EFBIG mid-write, as FAT32 does past 4 GiB."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-m", "comfyui_headroom", "convert", str(src), str(out), "--quiet"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120, preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "too large for this file system" in done.stderr
    assert _tree(tmp_path) == ["m.safetensors"]


def _in_private_tmpfs(tmp_path, script, size="3m"):
    """Run ``script`` (bash) with a fresh tmpfs of ``size`` at $T, in a private mount namespace (nothing outside
    sees the mount); skip when this machine does not allow it (not root, no user namespaces)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to mount a small file system privately")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[:200]}")
    body = f"set -u\nT={mnt}\nmount -t tmpfs -o size={size} tmpfs $T\n{script}"
    return subprocess.run([unshare, "-m", "--propagation", "private", "bash", "-c", body], capture_output=True,
                          text=True, env=_env(), cwd=tmp_path, timeout=300)


DRIVER = """
import sys
from comfyui_headroom import cli
from comfyui_headroom.quant import atomic
if sys.argv[1] == "no-preflight":  # let the disk fill up for real, mid-write
    atomic.check_free_space = lambda *args: None
raise SystemExit(cli.main(sys.argv[2:]))
"""


def test_full_and_read_only_file_systems(tmp_path, src):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    py = f"{sys.executable} {driver}"
    script = textwrap.dedent(f"""
        ls -A $T
        {py} preflight convert {src} $T/a/out.safetensors --quiet; echo "rc=$?"
        ls -A $T
        {py} no-preflight convert {src} $T/b/out.safetensors --quiet; echo "rc=$?"
        ls -A $T; echo "listed"
        mount -o remount,ro $T
        {py} preflight convert {src} $T/out.safetensors --quiet; echo "rc=$?"
    """)
    done = _in_private_tmpfs(tmp_path, script, size="3m")  # the model is 8 MiB, its INT8 file ~4 MiB
    assert done.returncode == 0, done.stderr
    out, err = done.stdout.splitlines(), done.stderr.strip().splitlines()
    assert out == ["rc=2", "rc=2", "listed", "rc=2"], (done.stdout, done.stderr)  # $T stays empty throughout
    assert len(err) == 3, err
    assert "needs" in err[0] and "free" in err[0]  # checked before writing
    assert "the disk is full" in err[1] and "b/out.safetensors" in err[1]  # the real ENOSPC, mid-write
    assert "read-only" in err[2]


# ---------------------------------------------------------------------------------------------------------
# Killed conversions: SIGTERM / SIGHUP clean up; after SIGKILL the next run does
# ---------------------------------------------------------------------------------------------------------

SLOW_DRIVER = """
import sys, time
from comfyui_headroom import cli
from comfyui_headroom.quant import convert
real = convert.quantize_streamed
def slow(*args, **kwargs):  # one quantized layer per 0.4 s: the test finds the conversion mid-write
    with open(sys.argv[1], "a") as mark:
        mark.write("x")
    time.sleep(0.4)
    return real(*args, **kwargs)
convert.quantize_streamed = slow
raise SystemExit(cli.main(sys.argv[2:]))
"""


def _start_slow(tmp_path, src, dst, *extra):
    driver = tmp_path / "slow_driver.py"
    driver.write_text(SLOW_DRIVER)
    mark = tmp_path / "mark"
    mark.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(driver), str(mark), "convert", str(src), str(dst), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (mark.exists() and len(mark.read_text()) >= 2):  # the second layer: the first is on disk
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never got going"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_removes_the_temporary(tmp_path, src, sig):
    dst = tmp_path / "made" / "out.safetensors"
    proc = _start_slow(tmp_path, src, dst)
    tmp = side_path(dst, pid=proc.pid)
    assert tmp.exists() and tmp.stat().st_size > 2**20  # mid-write: the header and a layer are on disk
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"headroom convert: stopped by {sig.name}; the unfinished output was "
                                        f"removed, nothing was written"]
    assert not (tmp_path / "made").exists()  # the temporary and the folder this run made


def test_sigterm_mid_folder_conversion_removes_the_temporary_folder(tmp_path, gen):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    for i in range(2):
        _model(folder / f"model-0000{i + 1}-of-00002.safetensors", gen, layers=2)
    before = _tree(tmp_path)
    proc = _start_slow(tmp_path, folder, tmp_path / "out")
    assert side_path(tmp_path / "out", pid=proc.pid).is_dir()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _tree(tmp_path) == sorted(before + ["mark", "slow_driver.py"])


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_after_sigkill_the_next_run_removes_only_our_stale_temporaries(tmp_path, src):
    dst = tmp_path / "out.safetensors"
    proc = _start_slow(tmp_path, src, dst)
    proc.kill()
    proc.communicate(timeout=60)
    stale = side_path(dst, pid=proc.pid)
    assert stale.exists() and not dst.exists()  # SIGKILL: nobody could clean up
    alive = side_path(dst, pid=os.getppid())  # some running process's temporary: not ours to touch
    alive.write_bytes(b"in progress")
    other = side_path(tmp_path / "other.safetensors", pid=_dead_pid())  # another OUT's: left alone
    other.write_bytes(b"x")
    lookalike = tmp_path / f".out.safetensors.{atomic.TEMP_TAG}-12ab"
    lookalike.write_bytes(b"x")

    done = subprocess.run([sys.executable, "-m", "comfyui_headroom", "convert", str(src), str(dst), "--quiet"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and alive.exists() and other.exists() and lookalike.exists()
    assert f"removed {stale.name}, left by process {proc.pid} (no longer running)" in done.stderr
    assert f"cleaned up: removed {stale.name}" in done.stdout
    assert detect_format(dst).format == "headroom"


def test_a_folder_out_moved_aside_by_a_killed_run_is_put_back(tmp_path, gen):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    _model(folder / "model.safetensors", gen, layers=1)
    dst = tmp_path / "out"
    convert_folder(folder, dst, progress=False)
    # a run with --overwrite killed between its two renames: the old OUT aside, the new one unfinished
    pid = _dead_pid()
    os.replace(dst, side_path(dst, atomic.OLD_TAG, pid))
    side_path(dst, pid=pid).mkdir()
    with pytest.raises(ConvertError, match="already exists"):  # the previous OUT is back: nothing overwritten
        convert_folder(folder, dst, progress=False)
    assert _tree(tmp_path) == sorted(["pipeline", "pipeline/model.safetensors", "out", "out/model.safetensors"])
    report = convert_folder(folder, dst, progress=False, overwrite=True)
    assert report.stale_removed == [] and _tree(dst) == ["model.safetensors"]
