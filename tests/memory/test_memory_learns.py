"""Learning: on synthetic recall (the fact in an early segment, the question in the last one, which cannot see
it), a memory over a frozen tiny backbone learns to answer while the same modules without memory stay at chance."""
import jax
import numpy as np
import pytest

from gmem_jax.backbones import BackboneConfig, init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory
from gmem_jax.tasks.base import collate
from gmem_jax.tasks.synthetic import SyntheticTask
from gmem_jax.tasks.tokenizers import WordTokenizer
from gmem_jax.training.step import init_train_state, make_eval_step, make_optimizer, make_train_step


def _train_and_score(use_memory, n_people, steps, n_train, write_attention="tokens", lr=3e-3,
                     **memory_options):
    """(right, the other stated city, chance) for the answer's first token on 256 dev documents; with
    memory_options also the accuracy at the answer's second target (the EOS) as a fourth value."""
    task = SyntheticTask(hops=(1,), n_people=n_people, n_distractors=0, lexicon_sizes=(16, 8, 4, 2),
                         n_examples={"train": n_train})
    tok = WordTokenizer.from_texts(task.texts())
    dims = dict(n_seg=3, seg_len=16, max_sents=4)
    train = collate(task.examples("train", tok, **dims, limit=n_train))
    dev = collate(task.examples("dev", tok, **dims, limit=256))
    cfg = BackboneConfig(arch="llama", vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=64,
                         norm_eps=1e-5, tie_word_embeddings=True)
    frozen = init_params(cfg, jax.random.PRNGKey(0))
    mcfg = MemoryConfig(num_slots=16, mem_dim=64, num_heads=4, loss_positions=4, write_attention=write_attention,
                        **memory_options)
    opt = make_optimizer(learning_rate=lr, total_steps=steps, warmup_steps=20)
    state = init_train_state(init_memory(jax.random.PRNGKey(1), cfg, mcfg), opt)
    step = make_train_step(cfg, mcfg, opt, use_memory=use_memory)
    keys = ("tokens", "token_mask", "labels", "loss_mask")
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.choice(n_train, 32, replace=False)
        state, _ = step(state, frozen, {k: train[k][idx] for k in keys})
    out = make_eval_step(cfg, mcfg, use_memory=use_memory)(state["params"], frozen, {k: dev[k] for k in keys})
    # The answer's first token: the first loss position of the last segment.
    pos = np.asarray(out.positions)[:, -1, 0]
    gold = dev["labels"][np.arange(len(pos)), -1, pos]
    pred = np.asarray(out.predictions)[:, -1, 0]
    right = pred == gold
    # A wrong answer that is a token of the context: with two people, the other person's city.
    stated = np.array([p in set(ctx.tolist()) for p, ctx in zip(pred, dev["tokens"][:, :-1].reshape(len(pred), -1))])
    scores = float(right.mean()), float((stated & ~right).mean()), task.chance_level()
    if not memory_options:
        return scores
    second = np.asarray(out.positions)[:, -1, 1]
    rows = np.arange(len(second))
    assert (dev["loss_mask"][rows, -1, second] > 0).all()  # every dev answer here is one token + EOS
    return scores + (float((np.asarray(out.predictions)[:, -1, 1] == dev["labels"][rows, -1, second]).mean()),)


@pytest.mark.parametrize("n_people, steps, n_train, floor", [(1, 300, 4096, 0.9)])
def test_memory_learns_recall_that_no_memory_cannot(n_people, steps, n_train, floor):
    with_memory, _, chance = _train_and_score(True, n_people, steps, n_train)
    without, _, _ = _train_and_score(False, n_people, steps, n_train)
    assert with_memory >= floor, (with_memory, without, chance)
    assert without <= chance + 0.1, (with_memory, without, chance)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known limitation (docs/results.md, 'Copy, not binding'): the paper's token "
                   "write copies a stated city but picks the asked person's no more often than the other person's")
def test_memory_binds_person_to_city_among_distractor_people():
    """Two people in the context: the memory must bind who lives where, not just remember a city. Copying either
    stated city already answers about half right, so the test asks for the right city far more often than the
    other person's."""
    with_memory, other_city, chance = _train_and_score(True, 2, 1500, 10000)
    without, _, _ = _train_and_score(False, 2, 1500, 10000)
    assert without <= chance + 0.1, (without, chance)
    assert with_memory >= 0.8 and other_city <= 0.1, (with_memory, other_city, without, chance)


@pytest.mark.slow  # ~5 min on 2 cores
def test_keyed_memory_binds_when_later_targets_do_not_train_it():
    """The same two-people task with the keyed write, memory.read_grad_targets=1 and memory.token_gate: the EOS
    target trains the injection's map of h and the token gate, but nothing the memory reads. It binds and ends
    the answer (measured 99.6% right, 0.4% the other person's city, EOS 100%); trained on the EOS through the memory
    as well it copies instead (50 / 42), and without the gate the EOS is predicted 65% of the time
    (docs/results.md, 'Binding with the EOS target kept')."""
    right, other_city, _, eos = _train_and_score(True, 2, 6000, 50000, write_attention="keyed", lr=1e-3,
                                                 read_grad_targets=1, token_gate=True)
    assert right >= 0.9 and other_city <= 0.08 and eos >= 0.95, (right, other_city, eos)
