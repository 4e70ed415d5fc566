"""Synthetic multi-hop recall: determinism, answers solvable from the context alone, chance level."""
import re

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks.synthetic import SyntheticTask
from gmem_jax.tasks.tokenizers import WordTokenizer

LIVES = re.compile(r"(\w+) lives in (\w+)\.")
IN = re.compile(r"(\w+) is in (\w+)\.")
PART = re.compile(r"(\w+) is part of (\w+)\.")
QUESTION = re.compile(r"Question: (Where does|In which country does|In which region does) (\w+) live\?")


def solve(context: str, question: str, person: str | None = None) -> str:
    """An independent reader: follow the stated links from the asked person, or from `person` asked the same
    question (must be unambiguous)."""
    links = [dict(), dict(), dict()]
    for level, pattern in enumerate((LIVES, IN, PART)):
        for a, b in pattern.findall(context):
            assert links[level].setdefault(a, b) == b, f"contradictory statements about {a}"
    kind, asked = QUESTION.search(question).groups()
    person = person or asked
    hops = {"Where does": 1, "In which country does": 2, "In which region does": 3}[kind]
    entity = person
    for level in range(hops):
        entity = links[level][entity]
    return entity


def decode_segments(tok, ex):
    return [tok.decode(ex.tokens[s][ex.token_mask[s]]) for s in range(ex.tokens.shape[0])]


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(hops=(1, 2, 3), n_people=5, n_distractors=6)


def test_word_tokenizer_answers_solvable_from_context_only(task):
    tok = WordTokenizer.from_texts(task.texts("train"), vocab_size=512)
    assert len(tok._vocab) < 512
    exs = task.examples("train", tok, n_seg=6, seg_len=48, max_sents=12, seed=3, limit=60)
    hops = set()
    for ex in exs:
        assert tok.unk_token_id not in ex.tokens[ex.token_mask]
        segs = decode_segments(tok, ex)
        context, last = " ".join(segs[:-1]), segs[-1]
        assert ex.meta["dropped_tokens"] == 0 and not LIVES.search(last) and not IN.search(last)  # facts not last
        answer = ex.meta["answers"][0]
        assert solve(context, last) == answer and last.endswith(f"Answer: {answer} <eos>")
        assert answer in task.candidates(ex.meta["hop"])
        asked = QUESTION.search(last).group(2)
        others = {solve(context, last, p) for p, _ in LIVES.findall(context) if p != asked} - {answer}
        assert sorted(ex.meta["other_answers"]) == sorted(others)
        # the supporting sentences are exactly the hop-long chain
        support = [ex.meta["sent_keys"][s][k] for s, k in zip(*np.nonzero(ex.sent_label))]
        assert len(support) == ex.meta["hop"]
        n_sent = int(ex.sent_mask.sum())
        assert n_sent >= 5 + 6  # 5 people's "lives in" statements + 6 distractors (+ shared city/country links)
        hops.add(ex.meta["hop"])
    assert hops == {1, 2, 3}


def test_deterministic_by_seed_and_split(task):
    tok = WordTokenizer.from_texts(task.texts())
    kw = dict(n_seg=6, seg_len=48, max_sents=12, limit=5)
    a, b = task.examples("train", tok, seed=1, **kw), task.examples("train", tok, seed=1, **kw)
    assert all((x.tokens == y.tokens).all() and x.meta == y.meta for x, y in zip(a, b))
    assert any((x.tokens != y.tokens).any() for x, y in zip(a, task.examples("train", tok, seed=2, **kw)))
    assert any((x.tokens != y.tokens).any() for x, y in zip(a, task.examples("dev", tok, seed=1, **kw)))
    # example i does not depend on how many are drawn
    np.testing.assert_array_equal(task.examples("train", tok, seed=1, **{**kw, "limit": 2})[1].tokens, a[1].tokens)


def test_real_tokenizer(task, gpt2_tok):
    exs = task.examples("dev", gpt2_tok, n_seg=4, seg_len=96, max_sents=16, limit=10)
    for ex in exs:
        segs = decode_segments(gpt2_tok, ex)
        assert solve("".join(segs[:-1]), segs[-1]) == ex.meta["answers"][0]


def test_chance_level_and_score(task):
    assert task.chance_level(1) == 1 / 32 and task.chance_level(2) == 1 / 16 and task.chance_level(3) == 1 / 8
    assert task.chance_level() == pytest.approx((1 / 32 + 1 / 16 + 1 / 8) / 3)
    tok = WordTokenizer.from_texts(task.texts())
    exs = task.examples("dev", tok, n_seg=6, seg_len=48, max_sents=12, limit=30)
    preds = {e.meta["id"]: {"answer": e.meta["answers"][0] if e.meta["hop"] == 1 else "nobody"} for e in exs}
    scores = task.score(preds, exs)
    share1 = np.mean([e.meta["hop"] == 1 for e in exs])
    assert scores["hop1_em"] == 1.0 and scores["hop2_em"] == 0.0 and scores["em"] == pytest.approx(share1)
    assert scores["hop2_chance"] == 1 / 16
    assert scores["other_person"] == 0.0
    # answering with another stated person's answer, where there is one, counts as other_person and not em
    wrong = {e.meta["id"]: {"answer": (e.meta["other_answers"] or ["nobody"])[-1]} for e in exs}
    scores = task.score(wrong, exs)
    assert scores["em"] == 0.0
    assert scores["other_person"] == pytest.approx(np.mean([bool(e.meta["other_answers"]) for e in exs]))
    assert scores["other_person"] > 0.5
    assert scores["chance"] == pytest.approx(np.mean([1 / len(task.candidates(e.meta["hop"])) for e in exs]))


def test_options_are_checked():
    with pytest.raises(GmemError, match="hops"):
        SyntheticTask(hops=(4,))
    with pytest.raises(GmemError, match="n_people"):
        SyntheticTask(n_people=100)
    with pytest.raises(GmemError, match="unknown split"):
        SyntheticTask().examples("validation", WordTokenizer([]), n_seg=2, seg_len=8, max_sents=1)
