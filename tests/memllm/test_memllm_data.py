"""MemLLM training examples from the real ZsRE edit set."""
import json
import logging

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memllm.calls import ReadCall, WriteCall, parse_calls
from gmem_jax.memllm.data import build_examples, encode_examples, relation_from_question
from gmem_jax.memllm.embed import normalize_text
from gmem_jax.memllm.store import ReadConfig, TripleStore


@pytest.fixture(scope="module")
def raw(shared_data):
    return json.loads((shared_data / "zsre" / "zsre_mend_edit_837.json").read_text())


def test_relation_from_question():
    assert relation_from_question("Call the Doctor", "What artist created Call the Doctor?") == "what artist created"
    assert relation_from_question("Ramalinaceae", "Which family does  ramalinaceae belong to?") == \
        "which family does belong to"
    assert relation_from_question("Platypatrobus", "The genus Platypatrobus is a part of what family?") == \
        "the genus is a part of what family"
    assert relation_from_question("Nobody", "What artist created Call the Doctor?") is None
    assert relation_from_question("Paris", "Paris?") is None
    assert relation_from_question("a.b (c)", "Who made a.b (c)?") == "who made"  # regex characters are literal


def test_examples_of_the_first_record(raw):
    rec = raw[0]  # IAAF Combined Events Challenge / inception / 2006
    write, read_src, read_reph, loc = build_examples([rec])
    assert (write.kind, write.prompt, write.target) == (
        "write", "The answer to 'When was the inception of IAAF Combined Events Challenge?' is 2006.",
        " ({MEM_WRITE--> IAAF Combined Events Challenge>>when was the inception of>>2006})")
    call = " ({MEM_READ(IAAF Combined Events Challenge>>when was the inception of>>)-->"
    assert read_src.prompt == "Question: When was the inception of IAAF Combined Events Challenge?\nAnswer:"
    assert read_src.segments == ((call, True), (" 2006})", False), (" 2006", True))
    assert read_reph.prompt == "Question: When was the IAAF Combined Events Challenge launched?\nAnswer:"
    assert read_reph.segments == read_src.segments  # a paraphrase asks the same canonical query
    assert (loc.prompt, loc.target) == ("Question: what is the name of the last episode of spongebob\nAnswer:",
                                        " The String")


def test_all_records_parse_back_and_are_readable_from_a_store(raw, tmp_path):
    examples = build_examples(raw)
    by_kind = {k: [e for e in examples if e.kind == k] for k in ("write", "read", "locality")}
    assert len(by_kind["write"]) == len(by_kind["locality"]) == len(raw)  # no record skipped
    assert len(raw) < len(by_kind["read"]) <= 2 * len(raw)
    with TripleStore(tmp_path / "zsre.sqlite") as store:
        for ex in by_kind["write"]:
            (call,) = parse_calls(ex.target)
            rec = raw[ex.record_index]
            assert isinstance(call, WriteCall) and call.triples[0].subject == rec["subject"].strip()
            assert call.triples[0].object == rec["alt"].strip()
            store.insert(call.triples)
        for ex in by_kind["read"]:
            (call,) = parse_calls(ex.target)
            alt = raw[ex.record_index]["alt"].strip()
            assert isinstance(call, ReadCall) and call.results == (alt,)
            assert ex.target.endswith("}) " + alt)
            # What was written answers what is asked, by exact match (the store keeps the first-seen spelling).
            got = store.read(call.queries[0], ReadConfig(entity_threshold=0.0, relation_threshold=0.0))
            assert normalize_text(alt) in map(normalize_text, got)
        for ex in by_kind["locality"]:
            assert parse_calls(ex.target) == []


def test_skips_unwritable_records(raw, caplog):
    bad = [dict(raw[1], alt="a;b"), dict(raw[2], subject="Nowhere in the question"), raw[3]]
    with caplog.at_level(logging.WARNING, logger="gmem_jax.memllm.data"):
        examples = build_examples(bad, kinds=("write",))
    assert [e.record_index for e in examples] == [2]
    assert "skipped 2 of 3 records" in caplog.text
    with pytest.raises(GmemError, match="choose among"):
        build_examples(raw, kinds=("edit",))
    with pytest.raises(GmemError, match="field 'alt'"):
        build_examples([dict(raw[0], alt="")])


def test_encode_examples_masks_only_trained_segments(raw, shared_data):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(shared_data / "tokenizers" / "gpt2")
    examples = build_examples(raw[:20])
    batch = encode_examples(examples, tok, max_len=64, pad_id=0, eos_id=50256)
    n = len(batch["tokens"])
    assert 0 < n <= len(examples) and batch["tokens"].shape == (n, 64)
    kept = [e for e in examples if len(tok(e.prompt)["input_ids"]) + sum(
        len(tok(t)["input_ids"]) for t, _ in e.segments) + 1 <= 64]
    assert len(kept) == n
    for ex, toks, mask, loss in zip(kept, batch["tokens"], batch["mask"], batch["loss_mask"]):
        real = toks[mask]
        assert tok.decode(real[:-1]) == ex.prompt + ex.target and real[-1] == 50256
        assert not (loss & ~mask).any()
        trained = "".join(t for t, keep in ex.segments if keep)
        assert tok.decode(toks[loss][:-1]) == trained  # the spliced results and the prompt are not targets
        assert np.all(toks[~mask] == 0)
