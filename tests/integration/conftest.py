"""Fixtures for tests against a real ComfyUI.

``comfyui_server`` (session scope): ONE headless ComfyUI per test session (tests/comfyui_server.py), CPU,
127.0.0.1 on a free port, this repo linked into its custom_nodes. Skips with the reason when COMFYUI_DIR or
HEADROOM_COMFY_PYTHON is missing. Other helpers' tests in this folder reuse it: put checkpoints into
``server.models("diffusion_models")`` etc., then ``server.run(api_prompt)``.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from comfyui_server import ComfyServer, skip_reason  # noqa: E402


@pytest.fixture(scope="session")
def comfyui_server(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = ComfyServer(tmp_path_factory.mktemp("comfyui"))
    server.start()
    yield server
    server.stop()
