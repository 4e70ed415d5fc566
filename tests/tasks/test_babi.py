"""bAbI parsing, the hub story layout, examples, BABILong lengths and the window baseline."""
import datasets
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks.babi import (PEOPLE, BabiTask, babi_file, normalize_babi_stories, parse_babi, read_filler,
                                 story_entities)


@pytest.fixture(scope="module")
def babi_dir(shared_data):
    return shared_data / "babi" / "en-10k"


@pytest.mark.parametrize("task, split, n_questions", [(1, "train", 10000), (1, "test", 1000), (3, "test", 1000),
                                                      (5, "train", None)])
def test_parser_counts(babi_dir, task, split, n_questions):
    path = babi_file(babi_dir, task, split)
    lines = path.read_text().splitlines()
    questions = parse_babi(lines, task=task, source=str(path))
    # independent counts straight from the text: question lines carry tabs; a story starts at line id 1
    assert len(questions) == sum("\t" in line for line in lines) == (n_questions or len(questions))
    assert len({q.story for q in questions}) == sum(line.startswith("1 ") for line in lines)
    for q in questions[:200]:
        fact_ids = [lid for lid, _ in q.facts]
        assert fact_ids == sorted(fact_ids) and fact_ids[-1] < q.line and set(q.supporting) <= set(fact_ids)


def test_parser_story_contents(babi_dir):
    qs = parse_babi(babi_file(babi_dir, 1, "train").read_text().splitlines(), task=1)
    assert qs[0].facts == ((1, "Mary moved to the bathroom."), (2, "John went to the hallway."))
    assert (qs[0].question, qs[0].answer, qs[0].supporting) == ("Where is Mary?", "bathroom", (1,))
    assert [lid for lid, _ in qs[1].facts] == [1, 2, 4, 5]  # the earlier question (line 3) is not context
    assert qs[5].story == 1 and qs[5].facts[0] == (1, "Sandra travelled to the office.")


@pytest.mark.parametrize("lines, message", [
    (["1 Mary went home.", "x Where?\tb\t1"], r"f.txt:2: expected 'ID text'"),
    (["1 Mary went home.", "3 John left."], "f.txt:2: line id 3 follows 1"),
    (["1 Mary went home.", "2 Where is Mary?\thome"], r"f.txt:2: a question line needs"),
    (["1 Mary went home.", "2 Where is Mary?\thome\tone"], r"f.txt:2: a question line needs"),
])
def test_parser_rejects_malformed_lines(lines, message):
    with pytest.raises(GmemError, match=message):
        parse_babi(lines, task=1, source="f.txt")


def test_missing_file_is_named(babi_dir, gpt2_tok):
    with pytest.raises(GmemError, match=r"no single qa3_\*_train.txt .*qa3_three-supporting-facts_test.txt"):
        BabiTask(babi_dir, tasks=(3,)).examples("train", gpt2_tok, n_seg=4, seg_len=64, max_sents=8, limit=1)


def test_hub_story_layout_matches_the_file(babi_dir):
    lines = babi_file(babi_dir, 2, "test").read_text().splitlines()
    from_file = [q for q in parse_babi(lines, task=2) if q.story < 3]
    stories, cur = [], None
    for line in lines:
        lid, _, text = line.partition(" ")
        if lid == "1":
            if len(stories) == 3:
                break
            cur = {"id": [], "type": [], "text": [], "supporting_ids": [], "answer": []}
            stories.append(cur)
        q, ans, sup = (text.split("\t") + ["", ""])[:3] if "\t" in text else (text, "", "")
        cur["id"].append(lid), cur["type"].append(int("\t" in text)), cur["text"].append(q)
        cur["supporting_ids"].append(sup.split()), cur["answer"].append(ans)
    hub = datasets.Dataset.from_dict({"story": stories})
    assert normalize_babi_stories(hub, task=2) == from_file
    with pytest.raises(GmemError, match="record 0: field 'story'"):
        normalize_babi_stories([{"story": {"id": ["1"]}}], task=2)


def test_examples_and_score(babi_dir, gpt2_tok):
    task = BabiTask(babi_dir, tasks=(1, 2))
    exs = task.examples("test", gpt2_tok, n_seg=4, seg_len=96, max_sents=12, limit=5)
    assert len(exs) == 10 and [e.meta["babi_task"] for e in exs] == [1] * 5 + [2] * 5
    qs = parse_babi(babi_file(babi_dir, 2, "test").read_text().splitlines(), task=2)[:5]
    for ex, q in zip(exs[5:], qs):
        keys = [k for row in ex.meta["sent_keys"] for k in row if k is not None]
        assert keys == [("qa2", lid) for lid, _ in q.facts]
        labelled = {ex.meta["sent_keys"][s][k] for s, k in zip(*np.nonzero(ex.sent_label))}
        assert labelled == {("qa2", s) for s in q.supporting}
        support = [gpt2_tok.decode(ex.tokens[s][ex.support_mask[s]]) for s in range(ex.tokens.shape[0])]
        assert "".join(support) == "".join(" " + t for lid, t in q.facts if lid in q.supporting)
        last = gpt2_tok.decode(ex.tokens[-1][ex.token_mask[-1]])
        assert last == f"Question: {q.question}\nAnswer: {q.answer}<|endoftext|>"
    preds = {e.meta["id"]: {"answer": e.meta["answers"][0]} for e in exs[:5]}  # qa1 right, qa2 missing
    preds[exs[5].meta["id"]] = {"answer": "The " + exs[5].meta["answers"][0].upper() + "."}  # normalised match
    assert task.score(preds, exs) == pytest.approx({"qa1_em": 1.0, "qa2_em": 0.2, "em": 0.6})


@pytest.mark.parametrize("target", [512, 2048])
def test_babilong_lengths_order_and_window_baseline(shared_data, babi_dir, gpt2_tok, target):
    filler = shared_data / "text" / "wikitext-2" / "valid.txt"
    kw = dict(n_seg=target // 96 + 4, seg_len=128, max_sents=8, seed=7, limit=4)
    task = BabiTask(babi_dir, tasks=(1,), target_tokens=target, filler=filler)
    exs = task.examples("test", gpt2_tok, **kw)
    qs = parse_babi(babi_file(babi_dir, 1, "test").read_text().splitlines(), task=1)[:4]
    for ex, q in zip(exs, qs):
        n = ex.meta["context_tokens"]
        assert target - 16 <= n <= target and ex.meta["dropped_tokens"] == 0
        assert int(ex.token_mask[:-1].sum()) == n  # every context token is in the segments
        keys = [k for row in ex.meta["sent_keys"] for k in row if k is not None]
        assert keys == [("qa1", lid) for lid, _ in q.facts]  # all facts, in story order, among the filler
        text = gpt2_tok.decode([t for s in range(ex.tokens.shape[0] - 1) for t in ex.tokens[s][ex.token_mask[s]]])
        positions = [text.index(fact) for _, fact in q.facts]
        assert positions == sorted(positions)
    assert ex.meta["id"] == task.examples("test", gpt2_tok, **kw)[3].meta["id"]
    np.testing.assert_array_equal(ex.tokens, task.examples("test", gpt2_tok, **kw)[3].tokens)  # deterministic
    window = BabiTask(babi_dir, tasks=(1,), target_tokens=target, filler=filler, layout="prompt", window=100)
    wex = window.examples("test", gpt2_tok, **kw)[3]
    stream = [int(t) for s in range(ex.tokens.shape[0] - 1) for t in ex.tokens[s][ex.token_mask[s]]]
    sep = gpt2_tok("\n", add_special_tokens=False)["input_ids"]
    assert not wex.token_mask[:-1].any() and wex.meta["dropped_tokens"] == n - 100
    assert list(wex.tokens[-1, :100 + len(sep)]) == stream[-100:] + sep
    assert gpt2_tok.decode(wex.tokens[-1, 100 + len(sep):wex.prompt_len]) == f"Question: {q.question}\nAnswer:"


def test_read_filler_skips_headings_and_blank_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(" \n = Title = \n\n A first one . A 2 @,@ 000 @-@ year second ! Third ?\n = = Sub = = \n Last\n")
    assert read_filler(f) == ["A first one .", "A 2,000-year second !", "Third ?", "Last"]
    with pytest.raises(GmemError, match="needs a positive length and filler=PATH"):
        BabiTask("x", target_tokens=512)


def test_story_entities_number_people_by_first_appearance():
    facts = ["Mary moved to the bathroom.", "John went to the hallway.", "Mary got the milk there."]
    assert story_entities(facts, "Where is John?") == ([0, 1, 0], 1)
    assert story_entities(facts, "Where is the milk?") == ([0, 1, 0], -1)  # qa2 asks about an object
    # ids="name": the index in PEOPLE = (Daniel, John, Mary, Sandra), whatever the order; a stranger -1
    assert story_entities(facts, "Where is John?", "name") == ([2, 1, 2], 1)
    assert story_entities(["Bob went to the garden."] + facts, "Where is Bob?", "name") == ([-1, 2, 1, 2], -1)
    with pytest.raises(GmemError, match="entity_ids='person' unknown"):
        BabiTask("x", entity_ids="person")


@pytest.mark.parametrize("layout,ids", [("memory", "story"), ("prompt", "story"), ("memory", "name")])
def test_entity_labels_mark_each_fact_by_its_person_and_the_question_by_the_one_asked(shared_data, babi_dir,
                                                                                      gpt2_tok, layout, ids):
    """Every token of a fact carries its person's number (order of first appearance, or the name's index in PEOPLE),
    filler and the separator -1, the prompt and the answer the asked person's number; qa2's questions name no
    person: -1."""
    filler = shared_data / "text" / "wikitext-2" / "valid.txt"
    task = BabiTask(babi_dir, tasks=(1, 2), target_tokens=256, filler=filler, layout=layout,
                    window=None if layout == "memory" else 200, entity_ids=ids)
    exs = task.examples("test", gpt2_tok, n_seg=5, seg_len=256, max_sents=16, seed=3, limit=3)
    for ex in exs:
        q = [q for q in parse_babi(babi_file(babi_dir, ex.meta["babi_task"], "test").read_text().splitlines(),
                                   task=ex.meta["babi_task"])
             if ex.meta["id"] == f"qa{q.task}-test-{q.story}-{q.line}"][0]
        people = list(dict.fromkeys(t.split()[0] for _, t in q.facts))
        number = people.index if ids == "story" else PEOPLE.index
        assert ids == "story" or set(people) <= set(PEOPLE)
        asked = [number(w) for w in q.question.rstrip("?").split() if w in people]
        last = ex.entity[-1]
        n_last = int(ex.token_mask[-1].sum())
        want_q = asked[0] if q.task == 1 else -1
        assert q.task == 2 or len(asked) == 1
        context_len = n_last - len(gpt2_tok.encode(f"Question: {q.question}\nAnswer: {q.answer}")) - 1
        assert list(last[context_len:n_last]) == [want_q] * (n_last - context_len)
        assert np.all(ex.entity[~ex.token_mask] == -1)
        # the context tokens of each person, decoded, are exactly that person's facts (filler between them: -1)
        context = [(s, t) for s in range(ex.tokens.shape[0]) for t in range(ex.tokens.shape[1])
                   if ex.token_mask[s, t] and not (s == ex.tokens.shape[0] - 1 and t >= context_len)]
        for name in people:
            text = gpt2_tok.decode([ex.tokens[s, t] for s, t in context if ex.entity[s, t] == number(name)])
            facts = "".join(" " + t for _, t in q.facts if t.split()[0] == name)
            assert text == facts if layout == "memory" else facts.endswith(text)
        assert layout == "prompt" or ex.meta["dropped_tokens"] == 0
