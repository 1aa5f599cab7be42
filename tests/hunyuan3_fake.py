"""The tiny HunyuanImage-3 stand-in (tests/fixtures/hunyuan3_fake) written out as a model folder, for the tests of
that road. The fixture folder is no package (the folder it writes copies its modeling file), hence the file load."""

import importlib.util
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hunyuan3_fake"


def build_fake_folder(dest, **config_overrides) -> Path:
    """config.json + the fake's remote code + random safetensors + generation_config.json in ``dest``."""
    spec = importlib.util.spec_from_file_location("hunyuan3_build_fake", FIXTURE / "build_fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_fake_model_folder(dest, **config_overrides)
