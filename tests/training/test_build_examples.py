"""builders.build_examples says when the memory layout cut the context a long-context figure claims."""
import logging

import ml_collections

from gmem_jax.tasks.segment import Unit, build_example
from gmem_jax.training.builders import build_examples


class _Task:
    def __init__(self, examples):
        self._examples = examples

    def examples(self, split, tokenizer, **kw):
        return self._examples


def _example(n_units, layout="memory"):
    units = [Unit(tuple(range(100 + 10 * i, 106 + 10 * i)), key=("p", i)) for i in range(n_units)]  # 6 tokens each
    return build_example(units, [7, 8], [9], n_seg=3, seg_len=12, max_sents=4, pad_id=0, eos_id=1,
                         meta={"id": f"ex{n_units}"}, layout=layout)


def _config():
    return ml_collections.ConfigDict({"task": {"name": "demo", "n_seg": 3, "seg_len": 12, "max_sents": 4}})


def test_build_examples_warns_when_the_memory_layout_drops_context(caplog):
    fits, cut = _example(2), _example(6)  # 2 sentences fit one segment; 6 need 3 context segments, 2 exist
    assert cut.meta["dropped_tokens"] == 12 and fits.meta["dropped_tokens"] == 0
    with caplog.at_level(logging.WARNING, logger="gmem_jax.training.builders"):
        assert build_examples(_config(), _Task([fits, cut]), None, "test", None, 0) == [fits, cut]
    assert [r.getMessage() for r in caplog.records] == [
        "demo test: 1 of 2 examples do not fit task.n_seg=3 segments of 12 tokens; their oldest 12 tokens on "
        "average (2 context sentences in all) are dropped; raise task.n_seg to keep them"]


def test_build_examples_is_quiet_when_nothing_is_cut_or_the_cut_is_a_prompt_window(caplog):
    windowed = _example(6, layout="prompt")
    assert windowed.meta["dropped_tokens"] > 0
    with caplog.at_level(logging.WARNING, logger="gmem_jax.training.builders"):
        build_examples(_config(), _Task([_example(2), _example(2)]), None, "test", None, 0)
        build_examples(_config(), _Task([windowed]), None, "test", None, 0)
    assert not caplog.records
