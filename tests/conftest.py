import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("LILLAMA_HOME", str(Path.home() / ".cache" / "lillama-studio"))

from tiny import tiny_llama  # noqa: E402


@pytest.fixture
def tiny():
    return tiny_llama(layers=3)


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    from lillama_core.modeling.loading import load_model

    return load_model(name="smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as an ordinary transformers folder, for CLI and loader tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    loaded = tiny_llama(layers=3)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _own_measurement_cache(tmp_path, monkeypatch):
    """Each test starts with an empty measurement cache (planning/cache.py), so none is served another's."""
    monkeypatch.setenv("LILLAMA_MEASUREMENTS", str(tmp_path / "measurements"))
