"""ZsRE: parsing, the deterministic split, example kinds and layouts, and the editing metrics."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks.metrics import clean_generation, exact_match, token_em
from gmem_jax.tasks.zsre import KINDS, ZsRETask, normalize_zsre_records, split_zsre


@pytest.fixture(scope="module")
def zsre_file(shared_data):
    return shared_data / "zsre" / "zsre_mend_edit_837.json"


@pytest.fixture(scope="module")
def raw(zsre_file):
    return json.loads(zsre_file.read_text())


def test_parses_all_records(raw):
    records = normalize_zsre_records(raw, "zsre.json")
    assert len(records) == 837
    r = records[0]
    assert (r.subject, r.alt, r.answers) == ("IAAF Combined Events Challenge", "2006", ("1998",))
    assert r.portability == (raw[0]["portability"]["New Question"], "Athletics")
    assert r.query("locality") == ("what is the name of the last episode of spongebob", "The String")  # prefix cut


def test_split_is_deterministic_order_independent_and_pinned(raw):
    records = normalize_zsre_records(raw)
    dev, train = split_zsre(records, "dev"), split_zsre(records, "train")
    assert len(dev) == 168 and len(train) == 669 and not {r.src for r in dev} & {r.src for r in train}
    # Pinned: the split must be the same on every machine and run (a changed rule changes published numbers).
    assert [r.index for r in dev[:5]] == [1, 5, 7, 9, 19]
    shuffled = list(raw)
    random.Random(3).shuffle(shuffled)
    assert {r.src for r in split_zsre(normalize_zsre_records(shuffled), "dev")} == {r.src for r in dev}
    other_seed = {r.src for r in split_zsre(records, "dev", split_seed=1)}
    assert len(other_seed) == 168 and other_seed != {r.src for r in dev}
    with pytest.raises(GmemError, match="unknown split 'validation'"):
        split_zsre(records, "validation")


@pytest.mark.parametrize("field, value, message", [("alt", None, r"record 1 \(id .*\): field 'alt'"),
                                                   ("portability", {"New Question": "q"}, "field 'portability'"),
                                                   ("answers", [1], "field 'answers'")])
def test_malformed_record(raw, field, value, message):
    records = [dict(r) for r in raw[:3]]
    records[1][field] = value
    with pytest.raises(GmemError, match=message):
        normalize_zsre_records(records, "zsre.json")


def _segments(tok, ex):
    return [tok.decode(ex.tokens[s][ex.token_mask[s]]) for s in range(ex.tokens.shape[0])]


def test_memory_layout_kinds_and_distractor_edits(zsre_file, gpt2_tok):
    task = ZsRETask(zsre_file, n_distractor_edits=3)
    exs = task.examples("dev", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=0, limit=2)
    assert [e.meta["kind"] for e in exs] == list(KINDS) * 2
    rec = task.records("dev")[0]
    for ex in exs[:4]:
        segs = _segments(gpt2_tok, ex)
        context = "".join(segs[:-1])
        assert f" {rec.src} {rec.alt}." in context  # the edit is written before the query segment...
        assert (rec.src in segs[-1]) == (ex.meta["kind"] == "reliability")  # ...and only reliability re-asks it
        assert context.count("?") == 4  # the edit and 3 distractor edits, none in the query segment
        (s, k), = zip(*np.nonzero(ex.sent_label))  # exactly one supporting sentence: the edit itself
        assert ex.meta["sent_keys"][s][k] == ("edit", rec.index)
        question, answer = rec.query(ex.meta["kind"])
        assert segs[-1] == f"Question: {question.strip()}\nAnswer: {answer}<|endoftext|>"
        assert ex.meta["answers"] == [answer]
    again = task.examples("dev", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=0, limit=2)
    assert all((a.tokens == b.tokens).all() for a, b in zip(exs, again))
    reseeded = task.examples("dev", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=1, limit=2)
    assert any((a.tokens != b.tokens).any() for a, b in zip(exs, reseeded))


def test_baseline_layouts(zsre_file, gpt2_tok):
    rec = ZsRETask(zsre_file).records("dev")[0]
    none = ZsRETask(zsre_file, kinds=["generalization"], layout="none").examples(
        "dev", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, limit=1)[0]
    assert not none.token_mask[0].any()
    assert _segments(gpt2_tok, none)[-1] == f"Question: {rec.rephrase}\nAnswer: {rec.alt}<|endoftext|>"
    prompt = ZsRETask(zsre_file, kinds=["generalization"], layout="prompt").examples(
        "dev", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, limit=1)[0]
    assert not prompt.token_mask[0].any() and prompt.meta["dropped_tokens"] == 0
    assert _segments(gpt2_tok, prompt)[-1] == \
        f" {rec.src} {rec.alt}.\nQuestion: {rec.rephrase}\nAnswer: {rec.alt}<|endoftext|>"
    assert gpt2_tok.decode(prompt.tokens[-1, :prompt.prompt_len]).endswith("Answer:")


def test_token_em_exact_match_and_locality_helpers():
    pred = [[1, 2, 3, 0], [5, 5, 5, 5]]
    target = [[1, 2, 4, 9], [5, 6, 5, 7]]
    mask = [[1, 1, 1, 0], [0, 1, 1, 1]]
    np.testing.assert_allclose(token_em(pred, target, mask), [2 / 3, 1 / 3])
    assert token_em(np.array(pred[0]), np.array(pred[0]), np.array(mask[0])) == 1.0  # locality: identical outputs
    with pytest.raises(GmemError, match="no masked target"):
        token_em(pred, target, [[0, 0, 0, 0], [1, 0, 0, 0]])
    with pytest.raises(GmemError, match="same shape"):
        token_em(pred, target, [[1, 1]])
    assert exact_match("The Lamiinae.", ["x", "lamiinae"]) == 1.0 and exact_match("Lamia", ["Lamiinae"]) == 0.0
    assert clean_generation(" Lamiinae\nQuestion: next") == "Lamiinae"


def test_score(zsre_file, gpt2_tok):
    task = ZsRETask(zsre_file, kinds=["reliability", "generalization", "locality"])
    exs = task.examples("dev", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, limit=2)
    by_kind = {k: [e for e in exs if e.meta["kind"] == k] for k in task.kinds}
    preds = {}
    for e in by_kind["reliability"]:
        preds[e.meta["id"]] = {"answer": e.meta["answers"][0] + ".", "token_em": 1.0}
    preds[by_kind["generalization"][0].meta["id"]] = {"answer": "wrong", "token_em": 0.5}  # the other one: missing
    loc0, loc1 = by_kind["locality"]
    # EasyEdit's locality: teacher-forced argmax agreement with the frozen model, per example then averaged;
    # loc1's memory pass kept only its first 2 answer positions (memory.loss_positions), compared as a prefix
    preds[loc0.meta["id"]] = {"answer": "Frozen says this", "reference": "frozen says this", "token_em": 1.0,
                              "answer_preds": [5, 6, 7, 8], "reference_preds": [5, 6, 0, 8]}
    preds[loc1.meta["id"]] = {"answer": loc1.meta["answers"][0], "reference": "something else", "token_em": 0.0,
                              "answer_preds": [1, 2], "reference_preds": [1, 3, 4]}
    scores = {k: v for k, v in task.score(preds, exs).items() if not k.endswith("_novel")}  # novel: next test
    assert scores == pytest.approx({"reliability_em": 1.0, "generalization_em": 0.0, "locality_em": 0.5,
                                    "locality": 0.5, "reliability_token_em": 1.0, "generalization_token_em": 0.5,
                                    "locality_token_em": 0.5, "locality_token_agreement": (3 / 4 + 1 / 2) / 2})


def _record(i, alt, loc_ans="somewhere", answers=("true",), portability=None):
    return {"subject": f"Subject {i}", "src": f"What is subject {i}?", "rephrase": f"Subject {i} is what?",
            "alt": alt, "pred": "guess", "answers": list(answers), "loc": "nq question: who is it", "loc_ans": loc_ans,
            **({"portability": {"New Question": f"Q{i}?", "New Answer": portability}} if portability else {})}


def test_score_splits_out_novel_answers():
    """'{kind}_em_novel' scores only the dev examples whose gold answer (normalized) is none of the train split's
    answer strings (alt, pred, true answers, locality and portability answers)."""
    records = [_record(i, f"Alt {i}", loc_ans=f"Loc {i}", portability=f"Port {i}") for i in range(10)]
    task = ZsRETask(records, kinds=["reliability", "locality"])
    dev, train = task.records("dev"), task.records("train")
    assert len(dev) == 2
    # make one dev edit's answer a train record's locality answer (seen, via a field other than alt; the split
    # does not depend on loc_ans)
    records[train[3].index]["loc_ans"] = f"the {dev[0].alt}!"  # the same after normalization
    task = ZsRETask(records, kinds=["reliability", "portability", "locality"])
    seen, novel = task.records("dev")
    assert seen.index == dev[0].index

    exs = [SimpleNamespace(meta={"id": f"{r.index}-{k}", "kind": k, "answers": [a]})  # score() reads only meta
           for r in (seen, novel) for k, a in (("reliability", r.alt), ("portability", r.portability[1]),
                                                ("locality", r.loc_ans))]
    preds = {f"{seen.index}-reliability": {"answer": seen.alt, "token_em": 1.0},
             f"{novel.index}-reliability": {"answer": "wrong", "token_em": 0.25},
             f"{novel.index}-portability": {"answer": novel.portability[1], "token_em": 1.0}}
    scores = task.score(preds, exs)
    assert scores["reliability_em"] == 0.5 and scores["reliability_token_em"] == pytest.approx(0.625)
    assert scores["reliability_em_novel"] == 0.0 and scores["reliability_token_em_novel"] == 0.25
    assert scores["portability_em_novel"] == scores["portability_em"] == 0.5  # "Port i": both dev answers novel
    assert not [k for k in scores if k.startswith("locality") and k.endswith("_novel")]
    # every answer seen: no novel keys at all
    assert not [k for k in task.score(preds, [e for e in exs if e.meta["id"].startswith(f"{seen.index}-r")])
                if k.endswith("_novel")]


def test_counterfactual_pool_answers(zsre_file, gpt2_tok):
    """counterfactual_pool='answers': the new answers come from every answer string of the split (not only alts),
    never one of the record's own; deterministic per seed."""
    task = ZsRETask(zsre_file, kinds=["reliability"], counterfactual_alts=3, counterfactual_pool="answers")
    records = {r.index: r for r in task.records("train")}
    words = max(len(r.alt.split()) for r in records.values())
    pool = {a for r in records.values() for a in r.answer_strings() if len(a.split()) <= words}
    assert len(pool) < len(set().union(*(r.answer_strings() for r in records.values()))) - 10  # long NQ answers out
    alts = {r.alt.strip() for r in records.values()}
    exs = task.examples("train", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, seed=0, limit=20)
    drawn = [(e.meta["record_index"], e.meta["answers"][0]) for e in exs]
    assert len(drawn) == 60
    assert all(a in pool and a not in records[i].answer_strings() for i, a in drawn)
    assert len({a for _, a in drawn} - alts) > 20  # mostly strings no record has as its alt
    again = task.examples("train", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, seed=0, limit=20)
    assert [e.meta["answers"] for e in again] == [e.meta["answers"] for e in exs]
    with pytest.raises(GmemError, match="counterfactual_pool='alt'"):
        ZsRETask(zsre_file, counterfactual_pool="alt")


def test_counterfactual_alts_and_locality_targets(zsre_file, gpt2_tok):
    plain = ZsRETask(zsre_file)
    records = plain.records("train")
    targets = {r.index: f"frozen says {r.index}" for r in records[:2]}
    task = ZsRETask(zsre_file, counterfactual_alts=3, locality_targets=targets)
    exs = task.examples("train", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, seed=0, limit=2)
    # 2 records x 3 variants x (reliability, generalization, locality); portability is skipped
    assert [e.meta["kind"] for e in exs] == ["reliability", "generalization", "locality"] * 6
    assert len({e.meta["id"] for e in exs}) == len(exs)
    pool = {r.alt.strip() for r in records}
    for rec_i, rec in enumerate(records[:2]):
        for v in range(3):
            rel, gen, loc = exs[9 * rec_i + 3 * v: 9 * rec_i + 3 * v + 3]
            alt = rel.meta["answers"][0]
            assert alt != rec.alt.strip() and alt in pool  # another train record's alt, never its own
            assert gen.meta["answers"] == [alt]
            for ex in (rel, gen, loc):  # the written edit states the counterfactual answer
                assert _segments(gpt2_tok, ex)[0] == f" {rec.src} {alt}."
            assert _segments(gpt2_tok, rel)[-1] == f"Question: {rec.src}\nAnswer: {alt}<|endoftext|>"
            assert loc.meta["answers"] == [targets[rec.index]]
            assert _segments(gpt2_tok, loc)[-1].endswith(f"Answer: {targets[rec.index]}<|endoftext|>")
    alts = [e.meta["answers"][0] for e in exs if e.meta["kind"] == "reliability"]
    assert alts == [e.meta["answers"][0] for e in task.examples("train", gpt2_tok, n_seg=2, seg_len=64, max_sents=4,
                                                                 seed=0, limit=2) if e.meta["kind"] == "reliability"]
    assert alts != [e.meta["answers"][0] for e in task.examples("train", gpt2_tok, n_seg=2, seg_len=64, max_sents=4,
                                                                 seed=1, limit=2) if e.meta["kind"] == "reliability"]
    with pytest.raises(GmemError, match="no answer for record"):
        task.examples("train", gpt2_tok, n_seg=2, seg_len=64, max_sents=4, limit=3)
    with pytest.raises(GmemError, match="counterfactual_alts"):
        ZsRETask(zsre_file, counterfactual_alts=-1)


def test_mismatched_asks_another_records_question_over_this_records_edit(zsre_file, gpt2_tok):
    """kind 'mismatched' (training only): the written edit is the record's own, the question is another record's src
    or rephrase, never one of the written edits' records, with that record's true answer; drawn per (seed, record,
    variant)."""
    from gmem_jax.tasks.zsre import TRAIN_KINDS

    task = ZsRETask(zsre_file, kinds=["reliability", "mismatched"], n_distractor_edits=2, counterfactual_alts=2)
    records = {r.index: r for r in task.records("train")}
    exs = task.examples("train", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=0, limit=6)
    assert [e.meta["kind"] for e in exs] == ["reliability", "mismatched"] * 12
    questions = set()
    for rel, mis in zip(exs[::2], exs[1::2]):
        assert _segments(gpt2_tok, rel)[:-1] == _segments(gpt2_tok, mis)[:-1]  # the same written context
        written = {k[1] for keys in mis.meta["sent_keys"] for k in keys if k}
        assert mis.meta["record_index"] in written and len(written) == 3
        last = _segments(gpt2_tok, mis)[-1]
        owner = [r for r in records.values() if f"Question: {r.src}\n" in last or f"Question: {r.rephrase}\n" in last]
        assert owner and not {r.index for r in owner} & written  # a question no written edit concerns
        assert last.endswith(f"Answer: {mis.meta['answers'][0]}<|endoftext|>")
        assert mis.meta["answers"][0] in {(r.answers[0] if r.answers else r.pred) for r in owner}
        questions.add(last)
    assert len(questions) > 6  # drawn per variant, not one question per record
    again = task.examples("train", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=0, limit=6)
    assert [_segments(gpt2_tok, e) for e in again] == [_segments(gpt2_tok, e) for e in exs]
    reseeded = task.examples("train", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=1, limit=6)
    assert [_segments(gpt2_tok, e)[-1] for e in reseeded[1::2]] != [_segments(gpt2_tok, e)[-1] for e in exs[1::2]]
    assert "mismatched" in TRAIN_KINDS and "mismatched" not in KINDS  # never an evaluation kind by default
    # Four train records, three written: every mismatched question is the fourth's.
    small = ZsRETask(json.loads(zsre_file.read_text())[:5], kinds=["mismatched"], n_distractor_edits=2)
    four = small.records("train")
    assert len(four) == 4
    for ex in small.examples("train", gpt2_tok, n_seg=3, seg_len=96, max_sents=8, seed=0):
        written = {k[1] for keys in ex.meta["sent_keys"] for k in keys if k}
        (unwritten,) = [r for r in four if r.index not in written]
        assert _segments(gpt2_tok, ex)[-1] in {f"Question: {q}\nAnswer: {unwritten.answers[0]}<|endoftext|>"
                                               for q in (unwritten.src, unwritten.rephrase)}
    with pytest.raises(GmemError, match="needs a record besides the written edits"):
        ZsRETask(json.loads(zsre_file.read_text())[:5], kinds=["mismatched"], n_distractor_edits=3).examples(
            "train", gpt2_tok, n_seg=3, seg_len=96, max_sents=8)
    with pytest.raises(GmemError, match="unknown kinds"):
        ZsRETask(zsre_file, kinds=["mismatch"])
