"""Segmenting and the SegmentedExample contract, on raw token ids (no tokenizer, no model)."""
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.tasks.base import SegmentedExample, collate
from gmem_jax.tasks.segment import Unit, build_example, pack_units

PAD, EOS = 0, 1
PROMPT, ANSWER = [7, 8, 9], [10, 11]


def random_units(rng, n, seg_len, long_every=7):
    """Units with distinct token values (so positions can be traced back), some longer than seg_len."""
    units, nxt = [], 100
    for i in range(n):
        long = i % long_every == 3
        length = int(rng.integers(seg_len + 1, 2 * seg_len + 5) if long else rng.integers(1, seg_len // 2))
        units.append(Unit(tuple(range(nxt, nxt + length)), key=("doc", i), label=float(i % 3 == 0)))
        nxt += length
    return units


def build(units, n_seg=40, seg_len=16, max_sents=4, **kw):
    return build_example(units, PROMPT, ANSWER, n_seg=n_seg, seg_len=seg_len, max_sents=max_sents, pad_id=PAD,
                         eos_id=EOS, meta={"id": "doc"}, **kw)


def context_stream(ex):
    return [int(t) for s in range(ex.tokens.shape[0] - 1) for t in ex.tokens[s][ex.token_mask[s]]]


@pytest.mark.parametrize("seed", range(5))
def test_packing_keeps_tokens_never_splits_and_maps_keys(seed):
    rng = np.random.default_rng(seed)
    seg_len, max_sents = 16, 4
    units = random_units(rng, 30, seg_len)
    ex = build(units, seg_len=seg_len, max_sents=max_sents)
    ex.validate()
    assert ex.meta["dropped_tokens"] == 0
    # every token kept, in order
    assert context_stream(ex) == [t for u in units for t in u.tokens]
    # each sentence: one slot, ending at its last token; short ones wholly inside one segment
    slots = {ex.meta["sent_keys"][s][k]: (s, int(ex.sent_pos[s, k]), float(ex.sent_label[s, k]))
             for s, k in zip(*np.nonzero(ex.sent_mask))}
    assert sorted(slots) == sorted(u.key for u in units)
    # support_mask: exactly the tokens of the labelled (supporting) sentences, wherever their chunks went
    assert [int(t) for s in range(ex.tokens.shape[0] - 1) for t in ex.tokens[s][ex.support_mask[s]]] == \
        [t for u in units if u.label > 0 for t in u.tokens]
    assert not (ex.support_mask & ~ex.token_mask).any()
    for u in units:
        s, pos, label = slots[u.key]
        assert label == u.label
        if len(u.tokens) <= seg_len:
            assert tuple(ex.tokens[s, pos - len(u.tokens) + 1:pos + 1]) == u.tokens
        else:  # a long sentence: whole seg_len chunks in the segments before its last chunk
            tail = len(u.tokens) % seg_len or seg_len
            assert pos == tail - 1 and tuple(ex.tokens[s, :tail]) == u.tokens[-tail:]
            assert tuple(ex.tokens[s - 1]) == u.tokens[-tail - seg_len:-tail]
    # greedy: a segment is only closed when the next sentence does not fit (tokens or slots)
    pieces = pack_units(units, seg_len=seg_len, max_sents=max_sents)
    for seg, nxt in zip(pieces, pieces[1:]):
        used, n_slots = sum(p.end - p.start for p in seg), sum(p.last for p in seg)
        nxt_unit = units[nxt[0].unit]
        assert used + len(nxt_unit.tokens) > seg_len or n_slots == max_sents or nxt[0].start > 0
    assert ex.sent_mask.sum(1).max() <= max_sents


def test_front_padding_labels_and_loss_mask():
    units = [Unit((20, 21, 22), key=("a", 0)), Unit((23, 24), key=("a", 1), label=1.0)]
    ex = build(units, n_seg=4, seg_len=8, max_sents=3)
    assert ex.tokens.shape == (4, 8) and ex.sent_pos.shape == (4, 3)
    assert not ex.token_mask[:2].any() and ex.meta["n_context_segments"] == 1  # empty segments at the FRONT
    np.testing.assert_array_equal(ex.tokens[2], [20, 21, 22, 23, 24, PAD, PAD, PAD])
    np.testing.assert_array_equal(ex.sent_pos[2], [2, 4, 0])
    np.testing.assert_array_equal(ex.sent_label[2], [0, 1, 0])
    np.testing.assert_array_equal(ex.tokens[3], PROMPT + ANSWER + [EOS, PAD, PAD])
    assert ex.prompt_len == 3
    np.testing.assert_array_equal(ex.loss_mask[3], [0, 0, 1, 1, 1, 0, 0, 0])  # predicting a0, a1, EOS
    np.testing.assert_array_equal(ex.labels[3], [8, 9, 10, 11, EOS, 0, 0, 0])
    np.testing.assert_array_equal(ex.labels[2], [21, 22, 23, 24, 0, 0, 0, 0])
    assert ex.loss_mask[:3].sum() == 0
    # the general alignment rule
    t, s = np.nonzero(ex.loss_mask.T)[::-1]
    assert all(ex.labels[a, b] == ex.tokens[a, b + 1] for a, b in zip(t, s))
    m = ex.token_mask[:, 1:]
    np.testing.assert_array_equal(ex.labels[:, :-1][m], ex.tokens[:, 1:][m])


def test_overflow_drop_oldest_and_error():
    units = [Unit(tuple(range(100 + 10 * i, 106 + 10 * i)), key=("p", i)) for i in range(6)]  # 6 tokens each
    ex = build(units, n_seg=3, seg_len=12, max_sents=4)  # 3 context segments needed, 2 available
    stream = [t for u in units for t in u.tokens]
    assert ex.meta["dropped_tokens"] == 12 and ex.meta["dropped_sentences"] == 2
    assert context_stream(ex) == stream[12:]  # the earliest sentences went
    with pytest.raises(GmemError, match=r"example doc: the context needs 3 segments .* only n_seg-1=2"):
        build(units, n_seg=3, seg_len=12, max_sents=4, overflow="error")


def test_paragraphs_start_a_new_segment_when_they_do_not_fit():
    para = lambda g, base: [Unit((base + i, base + i, base + i, base + i), key=(g, i), group=g) for i in range(3)]  # noqa: E731
    units = para(0, 100) + para(1, 200)
    grouped = pack_units(units, seg_len=20, max_sents=8)
    assert [[p.unit for p in seg] for seg in grouped] == [[0, 1, 2], [3, 4, 5]]
    flat = pack_units([Unit(u.tokens, u.key) for u in units], seg_len=20, max_sents=8)
    assert [[p.unit for p in seg] for seg in flat] == [[0, 1, 2, 3, 4], [5]]
    # a paragraph longer than a segment is packed sentence by sentence from a fresh segment
    long_para = [Unit((300 + i,) * 8, key=(2, i), group=2) for i in range(3)]
    packed = pack_units([Unit((1, 2), key="x")] + long_para, seg_len=20, max_sents=8)
    assert [[p.unit for p in seg] for seg in packed] == [[0], [1, 2], [3]]


def test_max_sents_caps_sentences_per_segment_and_untitled_units_take_no_slot():
    units = [Unit((i + 2,), key=i) for i in range(5)] + [Unit((50, 51), slot=False)]
    packed = pack_units(units, seg_len=100, max_sents=2)
    assert [[p.unit for p in seg] for seg in packed] == [[0, 1], [2, 3], [4, 5]]
    ex = build(units, n_seg=5, seg_len=100, max_sents=2)
    assert ex.sent_mask.sum() == 5 and ex.meta["sent_keys"][3] == [4, None]
    no_slots = build(units, n_seg=2, seg_len=100, max_sents=0)  # max_sents=0: no slots, no cap
    assert no_slots.sent_pos.shape == (2, 0) and no_slots.token_mask[0].sum() == 7


def test_prompt_and_none_layouts():
    units = [Unit(tuple(range(100 + 5 * i, 105 + 5 * i)), key=i) for i in range(4)]  # 20 context tokens
    stream = [t for u in units for t in u.tokens]
    sep = [5]
    ex = build(units, n_seg=2, seg_len=16, layout="prompt", window=6, context_sep=sep)
    assert not ex.token_mask[0].any() and ex.prompt_len == 6 + 1 + 3
    np.testing.assert_array_equal(ex.tokens[1][:ex.prompt_len + 3], stream[-6:] + sep + PROMPT + ANSWER + [EOS])
    assert ex.meta["dropped_tokens"] == 14 and ex.meta["dropped_sentences"] == 2  # sentences 0, 1 wholly outside
    fit = build(units, n_seg=2, seg_len=16, layout="prompt", context_sep=sep)  # window=None: as much as fits
    assert fit.token_mask[1].all() and fit.prompt_len == 16 - 3
    with pytest.raises(GmemError, match="window=20"):
        build(units, n_seg=2, seg_len=16, layout="prompt", window=20)
    none = build(units, n_seg=3, seg_len=16, layout="none")
    assert not none.token_mask[:2].any() and none.meta["dropped_tokens"] == 20 and none.prompt_len == 3


def test_last_segment_too_small_is_an_error():
    with pytest.raises(GmemError, match=r"prompt \(3 tokens\) \+ answer \(2\) \+ EOS = 6 tokens .*seg_len=5"):
        build([], n_seg=2, seg_len=5)
    with pytest.raises(GmemError, match="empty prompt"):
        build_example([], [], ANSWER, n_seg=2, seg_len=8, max_sents=1, pad_id=PAD, eos_id=EOS)


def test_collate_stacks_pads_and_checks_shapes():
    rng = np.random.default_rng(0)
    exs = [build(random_units(rng, 6, 16), n_seg=12, seg_len=16, max_sents=4) for _ in range(3)]
    batch = collate(exs, pad_to=4)
    assert batch["tokens"].shape == (4, 12, 16) and batch["tokens"].dtype == np.int32
    assert batch["sent_pos"].shape == (4, 12, 4) and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["example_mask"], [True, True, True, False])
    np.testing.assert_array_equal(batch["prompt_len"], [3, 3, 3, 0])
    assert not batch["token_mask"][3].any() and batch["loss_mask"][3].sum() == 0
    np.testing.assert_array_equal(batch["labels"][1], exs[1].labels)
    other = build([], n_seg=2, seg_len=16)
    with pytest.raises(GmemError, match=r"\(2, 16, 4\)"):
        collate([exs[0], other])
    broken = SegmentedExample(**{**exs[0].__dict__, "loss_mask": exs[0].loss_mask.astype(np.float64)})
    with pytest.raises(GmemError, match="field loss_mask is float64"):
        collate([broken])


def test_first_loss_targets_keeps_the_answers_first_tokens_only():
    from gmem_jax.training.builders import first_loss_targets

    ex = build(random_units(np.random.default_rng(0), 3, 16), n_seg=6)
    targets = lambda e: e.labels[e.loss_mask > 0].tolist()  # noqa: E731  in reading order
    assert targets(ex) == ANSWER + [EOS]
    for n, want in ((1, ANSWER[:1]), (2, ANSWER), (3, ANSWER + [EOS]), (9, ANSWER + [EOS])):
        (cut,) = first_loss_targets([ex], n)
        assert targets(cut) == want, n
        assert cut.loss_mask.dtype == ex.loss_mask.dtype and np.array_equal(cut.labels, ex.labels)
    assert first_loss_targets([ex], 0)[0] is ex
    with pytest.raises(GmemError, match="loss_targets"):
        first_loss_targets([ex], -1)
