"""Fixtures of the task tests: the shared GPT-2 tokenizer (loaded once) and a tiny WordTokenizer."""
import pytest

from gmem_jax.tasks.tokenizers import WordTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def gpt2_tok(shared_data):
    return load_tokenizer(shared_data / "tokenizers" / "gpt2")


@pytest.fixture
def word_tok():
    return WordTokenizer.from_texts(["Question: Where is Mary?\nAnswer: kitchen", "Mary went to the kitchen."])
