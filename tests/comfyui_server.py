"""A real ComfyUI server for tests: headless, CPU, on 127.0.0.1, with this repo linked into custom_nodes.

Used through the session-scoped ``comfyui_server`` fixture of tests/integration/conftest.py (one server per
test session). Needs ``COMFYUI_DIR`` (extracted ComfyUI v0.29) and ``HEADROOM_COMFY_PYTHON`` (a python with
ComfyUI's requirements and this package); :func:`skip_reason` says what is missing.

Nothing is written into ``COMFYUI_DIR``: ``--base-directory`` moves models/, input/, output/, user/ and
custom_nodes/ into a temporary folder, and the server's working directory (its log file) is that folder too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = float(os.environ.get("HEADROOM_COMFY_START_TIMEOUT", "240"))


def skip_reason() -> str | None:
    comfy = os.environ.get("COMFYUI_DIR")
    python = os.environ.get("HEADROOM_COMFY_PYTHON")
    if not comfy or not os.path.isfile(os.path.join(comfy, "main.py")):
        return "COMFYUI_DIR is not set to an extracted ComfyUI (see docs/comfyui.md)"
    if not python or not os.path.exists(python):
        return "HEADROOM_COMFY_PYTHON is not set (a venv python with ComfyUI's requirements + this package)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start/stop ComfyUI; queue API-format prompts and wait for their history."""

    def __init__(self, base: Path, comfy_dir: str | None = None, python: str | None = None,
                 extra_args: tuple[str, ...] = (), cpu: bool = True) -> None:
        self.base = Path(base)
        self.comfy_dir = comfy_dir or os.environ["COMFYUI_DIR"]
        self.python = python or os.environ["HEADROOM_COMFY_PYTHON"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.cpu = cpu  # False: ComfyUI picks the GPU and its default memory mode (bench/dynamic_vram.py)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        for sub in ("custom_nodes", "models/diffusion_models", "models/text_encoders", "models/loras",
                    "models/vae", "input", "output", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "comfyui-headroom"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    # -- folders -------------------------------------------------------------------------------------
    def models(self, kind: str) -> Path:
        return self.base / "models" / kind

    @property
    def output(self) -> Path:
        return self.base / "output"

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        cmd = [self.python, os.path.join(self.comfy_dir, "main.py"), *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.base, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP ----------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"POST {path} -> {err.code}: {err.read().decode(errors='replace')}") from None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The prompt's history entry once it finished; RuntimeError with ComfyUI's message if it failed."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"prompt failed: {json.dumps(messages)[:4000]}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def text_of(self, entry: dict, node_id: str) -> str:
        """The ``ui.text`` a node returned (our nodes report their status that way)."""
        return "\n".join(entry["outputs"].get(node_id, {}).get("text", []))

    def latent_file(self, prefix: str) -> Path:
        files = sorted(self.output.glob(f"{prefix}_[0-9]*_.latent"))
        if not files:
            raise FileNotFoundError(f"no {prefix}_*.latent in {self.output}")
        return files[-1]


def start_server(base: Path) -> ComfyServer:
    return ComfyServer(base).start()


def cleanup(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
