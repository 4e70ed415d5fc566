"""HotpotQA loaders (original JSON, JSONL, hub layout), examples on real data, and scoring."""
import json
import types

import datasets
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks import hotpotqa
from gmem_jax.tasks.hotpot_metrics import METRIC_KEYS
from gmem_jax.tasks.hotpotqa import (
    HotpotQATask,
    load_hotpot_file,
    normalize_hotpot_records,
    supporting_facts_from_scores,
)
from gmem_jax.tasks.tokenizers import encode_batch


@pytest.fixture(scope="module")
def distractor_raw(shared_data):
    return json.loads((shared_data / "hotpotqa" / "dev_distractor_23.json").read_text())


def to_hub_columns(raw):
    """The hub hotpotqa/hotpot_qa layout, as columns for datasets.Dataset.from_dict."""
    return {"id": [r["_id"] for r in raw], "question": [r["question"] for r in raw],
            "answer": [r["answer"] for r in raw], "type": [r["type"] for r in raw], "level": [r["level"] for r in raw],
            "supporting_facts": [{"title": [t for t, _ in r["supporting_facts"]],
                                  "sent_id": [i for _, i in r["supporting_facts"]]} for r in raw],
            "context": [{"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}
                        for r in raw]}


def paragraph_ids(tok, title, sents):
    """Token ids of a paragraph as the task lays it out: " {title}:" then " " + each non-empty sentence."""
    return [t for ids in encode_batch(tok, [f" {title}:"] + [" " + x.strip() for x in sents if x.strip()]) for t in ids]


def test_loads_both_shared_files(shared_data, distractor_raw):
    dev = load_hotpot_file(shared_data / "hotpotqa" / "dev_distractor_23.json")
    assert len(dev) == 23 and dev[0].id == "5a8b57f25542995d1e6f1371" and dev[0].answer == "yes"
    assert dev[0].supporting_facts == (("Scott Derrickson", 0), ("Ed Wood", 0))
    assert [len(s) for _, s in dev[0].context] == [len(s) for _, s in distractor_raw[0]["context"]]
    full = load_hotpot_file(shared_data / "hotpotqa" / "fullwiki_dev500.jsonl")
    lines = (shared_data / "hotpotqa" / "fullwiki_dev500.jsonl").read_text().splitlines()
    assert len(full) == 500 and full[-1].id == json.loads(lines[-1])["_id"]


def test_hub_layout_equals_original(distractor_raw):
    hub = datasets.Dataset.from_dict(to_hub_columns(distractor_raw[:5]))
    assert normalize_hotpot_records(hub, "hub") == normalize_hotpot_records(distractor_raw[:5], "file")


def test_hub_source_goes_through_load_dataset(distractor_raw, monkeypatch, gpt2_tok):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(to_hub_columns(distractor_raw[:2]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    exs = HotpotQATask().examples("dev", gpt2_tok, n_seg=12, seg_len=256, max_sents=16)
    assert calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]
    assert [e.meta["id"] for e in exs] == [r["_id"] for r in distractor_raw[:2]]


@pytest.mark.parametrize("field, value, message", [
    ("context", None, r"record 1 \(id {id}\): field 'context' is a NoneType"),
    ("context", [["Title", "not a list"]], r"record 1 \(id {id}\): field 'context\[0\]'"),
    ("supporting_facts", [["Title", "0"]],
     r"record 1 \(id {id}\): field 'supporting_facts' has entry \['Title', '0'\]"),
    ("question", "", r"record 1 \(id {id}\): field 'question' is missing"),
])
def test_malformed_record_names_record_and_field(distractor_raw, field, value, message):
    records = [dict(r) for r in distractor_raw[:3]]
    records[1][field] = value
    with pytest.raises(GmemError, match=message.format(id=records[1]["_id"])):
        normalize_hotpot_records(records, "dev.json")


def test_examples_map_every_sentence_to_its_key(shared_data, distractor_raw, gpt2_tok):
    task = HotpotQATask(shared_data / "hotpotqa" / "dev_distractor_23.json")
    exs = task.examples("dev", gpt2_tok, n_seg=16, seg_len=256, max_sents=16, limit=6)
    assert len(exs) == 6
    for ex, raw in zip(exs, distractor_raw):
        assert ex.shape == (16, 256, 16) and ex.meta["dropped_tokens"] == 0
        sentences = {(t, i): s for t, sents in raw["context"] for i, s in enumerate(sents) if s.strip()}
        gold = {tuple(f) for f in raw["supporting_facts"]}
        found = {}
        for s, k in zip(*np.nonzero(ex.sent_mask)):
            key, pos = ex.meta["sent_keys"][s][k], ex.sent_pos[s, k]
            ids = gpt2_tok(" " + sentences[key].strip(), add_special_tokens=False)["input_ids"]
            assert list(ex.tokens[s, pos - len(ids) + 1:pos + 1]) == ids  # the sentence ends at sent_pos
            assert ex.sent_label[s, k] == float(key in gold)
            found[key] = s
        assert set(found) == set(sentences)
        # paragraph-aligned: a paragraph (title + sentences) that fits in a segment is in one segment
        for title, sents in raw["context"]:
            n_tokens = len(paragraph_ids(gpt2_tok, title, sents))
            segs = {found[(title, i)] for i, x in enumerate(sents) if x.strip()}
            assert len(segs) == 1 or n_tokens > 256 or len(sents) > 16
        # the whole document, in order: title line then sentences of each paragraph
        expect = [tok for t, sents in raw["context"] for tok in paragraph_ids(gpt2_tok, t, sents)]
        assert [int(t) for s in range(15) for t in ex.tokens[s][ex.token_mask[s]]] == expect
        last = gpt2_tok.decode(ex.tokens[-1][ex.token_mask[-1]])
        assert last == f"Question: {raw['question']}\nAnswer: {raw['answer']}<|endoftext|>"
        assert gpt2_tok.decode(ex.labels[-1][ex.loss_mask[-1] > 0]) == f" {raw['answer']}<|endoftext|>"


def test_score_and_sp_from_scores(shared_data, distractor_raw, gpt2_tok):
    task = HotpotQATask(shared_data / "hotpotqa" / "dev_distractor_23.json")
    exs = task.examples("dev", gpt2_tok, n_seg=16, seg_len=256, max_sents=16, limit=4)
    perfect = {e.meta["id"]: {"answer": e.meta["answers"][0], "sp": supporting_facts_from_scores(e, e.sent_label)}
               for e in exs}
    for e, raw in zip(exs, distractor_raw):
        assert sorted(map(tuple, perfect[e.meta["id"]]["sp"])) == sorted(map(tuple, raw["supporting_facts"]))
    assert task.score(perfect, exs) == {k: 1.0 for k in METRIC_KEYS}
    half = {k: v for k, v in list(perfect.items())[:2]}  # two of four questions missing -> count 0
    assert task.score(half, exs) == {k: 0.5 for k in METRIC_KEYS}
    answer_only = {k: {"answer": v["answer"]} for k, v in perfect.items()}
    scores = task.score(answer_only, exs)
    assert scores["em"] == 1.0 and scores["sp_em"] == 0.0 and scores["joint_f1"] == 0.0
    with pytest.raises(GmemError, match="scores shape"):
        supporting_facts_from_scores(exs[0], np.zeros((2, 2)))


def test_sp_top_k_takes_the_highest_scored_real_sentences():
    """Hand-made case: 2 segments x 4 sentence slots; the highest scores sit on padding and on a slot with no key."""
    ex = types.SimpleNamespace(sent_mask=np.array([[True, True, True, False], [True, True, True, False]]),
                               meta={"id": "q", "sent_keys": [[("A", 0), ("A", 1), ("B", 0), None],
                                                              [("B", 1), ("C", 0), None, None]]})
    scores = np.array([[0.10, 0.30, 0.05, 0.98], [0.30, 0.20, 0.99, 0.97]])
    assert supporting_facts_from_scores(ex, scores) == []  # no real sentence reaches 0.5
    assert supporting_facts_from_scores(ex, scores, threshold=0.25) == [["A", 1], ["B", 1]]
    assert supporting_facts_from_scores(ex, scores, top_k=1) == [["A", 1]]  # a tie goes to document order
    assert supporting_facts_from_scores(ex, scores, top_k=2) == [["A", 1], ["B", 1]]
    assert supporting_facts_from_scores(ex, scores, top_k=3) == [["A", 1], ["B", 1], ["C", 0]]
    assert supporting_facts_from_scores(ex, scores, top_k=9) == [["A", 0], ["A", 1], ["B", 0], ["B", 1], ["C", 0]]
    with pytest.raises(GmemError, match="top_k=-1"):
        supporting_facts_from_scores(ex, scores, top_k=-1)


def test_overflow_drops_oldest_paragraphs(shared_data, gpt2_tok):
    task = HotpotQATask(shared_data / "hotpotqa" / "dev_distractor_23.json")
    full = task.examples("dev", gpt2_tok, n_seg=16, seg_len=256, max_sents=16, limit=1)[0]
    short = task.examples("dev", gpt2_tok, n_seg=3, seg_len=256, max_sents=16, limit=1)[0]
    kept = [int(t) for s in range(2) for t in short.tokens[s][short.token_mask[s]]]
    stream = [int(t) for s in range(15) for t in full.tokens[s][full.token_mask[s]]]
    assert short.meta["dropped_tokens"] == len(stream) - len(kept) > 0 and stream[-len(kept):] == kept
    with pytest.raises(GmemError, match="raise n_seg or seg_len"):
        HotpotQATask(shared_data / "hotpotqa" / "dev_distractor_23.json", overflow="error").examples(
            "dev", gpt2_tok, n_seg=3, seg_len=256, max_sents=16, limit=1)
    assert hotpotqa.HUB_SPLITS["dev"] == "validation"


def test_split_mapping_source(shared_data, distractor_raw):
    task = HotpotQATask({"dev": shared_data / "hotpotqa" / "dev_distractor_23.json", "train": distractor_raw[:3]})
    assert len(task.records("dev")) == 23
    assert [r.id for r in task.records("train")] == [r["_id"] for r in distractor_raw[:3]]
    with pytest.raises(GmemError, match="no split 'test' in the given source; it has dev, train"):
        task.records("test")
    with pytest.raises(GmemError, match="is not a file"):
        HotpotQATask(shared_data / "nothing.json").records("dev")


def test_exclude_ids_drops_questions_shared_with_the_eval_file(shared_data):
    dev_file = shared_data / "hotpotqa" / "dev_distractor_23.json"
    full_file = shared_data / "hotpotqa" / "fullwiki_dev500.jsonl"
    dev_ids = {r["_id"] for r in json.loads(dev_file.read_text())}
    full_ids = [json.loads(line)["_id"] for line in full_file.read_text().splitlines()]
    shared = dev_ids & set(full_ids)
    assert len(shared) == 2  # the two files share these questions: training on them would leak the answers
    kept = HotpotQATask(full_file, exclude_ids=str(dev_file)).records("train")
    assert [r.id for r in kept] == [i for i in full_ids if i not in shared]
    assert len(HotpotQATask(full_file, exclude_ids=sorted(shared)[:1]).records("train")) == 499
