"""The properties the memory must have: identity at init, frozen params untouched, isolation, causality, gates."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones import forward
from gmem_jax.memory.model import (forward_segments, init_memory, initial_state, memory_hooks, memory_module,
                                   write_context)
from gmem_jax.errors import GmemError
from gmem_jax.memory.modules import GMemory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step

from memory_testlib import perturbed_memory, random_batch, small_memory, tiny_backbone


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fresh_memory_leaves_logits_exactly_unchanged(arch, injection):
    cfg, frozen = tiny_backbone(arch)
    mcfg = small_memory(injection)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    b = random_batch(cfg)
    # A non-trivial memory state (after writing two segments) must still leave the model exactly as it was.
    state = jax.jit(write_context, static_argnums=(4, 5))(mem, frozen, b["tokens"][:, :2], b["token_mask"][:, :2],
                                                          cfg, mcfg)
    assert float(jnp.abs(state - initial_state(mem, cfg, mcfg, 3)).max()) > 1e-3
    tokens = jnp.asarray(b["tokens"][:, 2])
    with_memory = jax.jit(lambda m, s, fz, t: forward(fz, t, cfg, **memory_hooks(m, s, cfg, mcfg)).logits)(
        mem, state, frozen, tokens)
    # Bitwise against the frozen model run through the same program structure (a residual hook splits the layer
    # scan in two, which XLA may fuse differently at the 1e-8 level) ...
    identity = {k: (lambda h: (h, None)) if k.endswith("hook") else v
                for k, v in memory_hooks(mem, state, cfg, mcfg).items()}
    plain = jax.jit(lambda fz, t: forward(fz, t, cfg, **identity).logits)(frozen, tokens)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_memory))
    # ... and to float rounding against the unsplit frozen model.
    unsplit = jax.jit(lambda fz, t: forward(fz, t, cfg).logits)(frozen, tokens)
    np.testing.assert_allclose(np.asarray(unsplit), np.asarray(with_memory), rtol=0, atol=1e-6)


def test_train_steps_touch_only_memory(injection):
    cfg, frozen = tiny_backbone("llama")
    frozen_before = jax.tree.map(np.array, frozen)
    mcfg = small_memory(injection)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    opt = make_optimizer(learning_rate=1e-2, total_steps=10)
    state = init_train_state(mem, opt)
    step = make_train_step(cfg, mcfg, opt)
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    first = None
    for _ in range(4):
        state, metrics = step(state, frozen, b)
        first = float(metrics["loss"]) if first is None else first
    assert int(state["step"]) == 4 and float(metrics["loss"]) < first
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, frozen_before)
    # The optimizer state holds only memory-shaped leaves: nothing the size of a backbone tensor.
    mem_shapes = sorted(x.shape for x in jax.tree.leaves(mem))
    opt_shapes = sorted(x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert opt_shapes == sorted(mem_shapes * 2)  # adam mu and nu, one each per memory leaf
    assert step._cache_size() == 1  # one compile for four steps


def test_permuting_the_batch_permutes_outputs(injection):
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory(injection)
    mem = perturbed_memory(cfg, mcfg)
    b = random_batch(cfg, B=4)
    perm = np.array([2, 0, 3, 1])
    f = jax.jit(lambda m, fz, bb: forward_segments(m, fz, bb, cfg, mcfg))
    out, out_p = f(mem, frozen, b), f(mem, frozen, {k: v[perm] for k, v in b.items()})
    np.testing.assert_allclose(np.asarray(out.segment_nll)[perm], np.asarray(out_p.segment_nll), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.state)[perm], np.asarray(out_p.state), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.predictions)[perm], np.asarray(out_p.predictions))


def test_resetting_one_example_does_not_touch_another(injection):
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory(injection)
    mem = perturbed_memory(cfg, mcfg)
    b = random_batch(cfg, B=3)
    f = jax.jit(lambda m, fz, bb: forward_segments(m, fz, bb, cfg, mcfg))
    reset = np.zeros((3, 4), bool)
    reset[0, 2] = True
    out, out_r = f(mem, frozen, b), f(mem, frozen, dict(b, reset=reset))
    nll, nll_r = np.asarray(out.segment_nll), np.asarray(out_r.segment_nll)
    np.testing.assert_array_equal(nll[1:], nll_r[1:])  # other examples: bit-for-bit the same
    np.testing.assert_array_equal(nll[0, :2], nll_r[0, :2])  # before the reset: same
    assert not np.allclose(nll[0, 2:], nll_r[0, 2:])  # after it: example 0 forgot segments 0-1


def test_changing_segment_k_changes_nothing_before_or_at_k(injection):
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory(injection)
    mem = perturbed_memory(cfg, mcfg)
    b = random_batch(cfg, B=2, N=4)
    f = jax.jit(lambda m, fz, bb: forward_segments(m, fz, bb, cfg, mcfg))
    base = np.asarray(f(mem, frozen, b).segment_nll)
    for k in range(3):
        changed = {key: v.copy() for key, v in b.items()}
        changed["tokens"][:, k, :5] = (changed["tokens"][:, k, :5] + 7) % cfg.vocab_size
        nll = np.asarray(f(mem, frozen, changed).segment_nll)
        # segments < k see nothing of segment k; segment k's own labels/loss are computed from its tokens, so we
        # check the memory path: segments <= k-1 identical, later segments differ through memory.
        np.testing.assert_array_equal(nll[:, :k], base[:, :k])
        assert not np.allclose(nll[:, k + 1:], base[:, k + 1:])


def test_segment_k_output_does_not_depend_on_its_own_memory_write(injection):
    """Causality through memory: segment k's outputs are the same whether or not segment k is written."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory(injection)
    mem = perturbed_memory(cfg, mcfg)
    b = random_batch(cfg, B=2, N=3)
    f = jax.jit(lambda m, fz, bb: forward_segments(m, fz, bb, cfg, mcfg).segment_nll)
    full = np.asarray(f(mem, frozen, b))
    for k in range(3):
        prefix = {key: v[:, : k + 1] for key, v in b.items()}
        np.testing.assert_allclose(np.asarray(f(mem, frozen, prefix)),
                                   full[:, : k + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", ["update", "gru"])
def test_gate_closed_keeps_memory_open_overwrites(gate):
    cfg, _ = tiny_backbone("llama")
    mcfg = small_memory("final", gate=gate)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    module = memory_module(cfg, mcfg)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 5, cfg.hidden_size))
    mask = jnp.ones((2, 5), bool)
    state = jax.random.normal(jax.random.PRNGKey(3), (2, mcfg.num_slots, mcfg.mem_dim))
    call = lambda *a, **kw: module.apply({"params": mem}, *a, **kw)
    closed, _ = call(state, h, mask, 0.0, method=GMemory.write)
    np.testing.assert_array_equal(np.asarray(closed), np.asarray(state))
    opened, _ = call(state, h, mask, 1.0, method=GMemory.write)

    def candidate(m, state, h, mask):  # what an open gate must store: the new content alone, no (1-z)*old term
        a = m.write_attn(state, m.encode(h), mask=mask[:, None, None, :])
        if gate == "update":
            return a
        reset = jax.nn.sigmoid(m.gate(jnp.concatenate([state, a], -1)))[..., mcfg.mem_dim:]
        return jnp.tanh(m.candidate(jnp.concatenate([reset * state, a], -1)))

    np.testing.assert_allclose(np.asarray(opened), np.asarray(call(state, h, mask, method=candidate)),
                               rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(opened - state).max()) > 1e-2
    # A segment with no real tokens leaves memory bit-for-bit unchanged even when the gate is forced open.
    empty, _ = call(state, h, jnp.zeros((2, 5), bool), 1.0, method=GMemory.write)
    np.testing.assert_array_equal(np.asarray(empty), np.asarray(state))


@pytest.mark.parametrize("token_gate", [False, True])
def test_read_grad_targets_stops_later_targets_training_the_memory(token_gate):
    """memory.read_grad_targets=1: the second answer target's loss trains the injection's map of h (W_h h + b) and
    the token gate, but nothing the read contributes (its half of the injection, the decoder, the addressing, the
    contents, the write); the forward pass is unchanged."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", sparsity_weight=0.0, entropy_weight=0.0,
                        token_gate=token_gate)
    mem = perturbed_memory(cfg, mcfg)
    b = random_batch(cfg, B=2, N=2, T=8, loss_frac=0.0)
    b["token_mask"][:] = True
    # hidden states in place of the frozen backbone's (a final-injection memory only sees those): a smaller program
    b["features"] = np.random.default_rng(1).standard_normal((2, 2, 8, cfg.hidden_size)).astype(np.float32)
    both, first = b["loss_mask"].copy(), b["loss_mask"].copy()
    both[:, 1, 4:6], first[:, 1, 4] = 1.0, 1.0  # the question segment's first two answer targets / its first only

    @partial(jax.jit, static_argnums=0)
    def grads(m, lmask):
        return jax.value_and_grad(lambda p: forward_segments(p, frozen, {**b, "loss_mask": lmask}, cfg, m).loss)(mem)

    loss_detached, g_detached = grads(mcfg.replace(read_grad_targets=1), both)
    loss_all, g_all = grads(mcfg, both)
    _, g_first = grads(mcfg, first)
    assert float(loss_detached) == float(loss_all)
    H = cfg.hidden_size

    def split(g):  # (what every target trains, what only the first trains)
        g = dict(g)
        if token_gate:
            every = (g.pop("inject_fuse"), g.pop("inject_token_gate"))
        else:
            fuse = g.pop("inject_fuse")
            every, g["inject_fuse_r"] = (fuse["kernel"][:H], fuse["bias"]), fuse["kernel"][H:]
        return every, g

    (e_detached, m_detached), (e_all, m_all), (e_first, m_first) = map(split, (g_detached, g_all, g_first))
    gap = lambda g, h: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())  # noqa: E731
                           for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(h)))
    for name in m_first:  # the CE is a mean: twice the targets, half the weight of the first one's gradient
        jax.tree.map(lambda a, f: np.testing.assert_allclose(np.asarray(a), 0.5 * np.asarray(f), rtol=2e-4,
                                                             atol=1e-7), m_detached[name], m_first[name])
        assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(m_first[name])) > 0, name
    # what every target trains gets what training on all of them gives (to rounding: W[h; r] is computed in two
    # parts), which is not the first target's alone
    assert gap(e_detached, e_all) < 1e-6
    assert gap(e_detached, jax.tree.map(lambda x: 0.5 * x, e_first)) > 1e-4
    for name in ("slot_keys", "decoder"):  # without the option the second target trains the memory too
        assert gap(m_detached[name], m_all[name]) > 1e-5, name


def _two_target_grads(cfg, frozen, n_seg):
    """A batch [2, n_seg, 8] of random cached features whose last segment has answer targets at positions 4 and 5:
    (grads(mcfg, mem_params, loss_mask) -> (loss, gradients), loss mask with both targets, with the first alone)."""
    b = random_batch(cfg, B=2, N=n_seg, T=8, loss_frac=0.0)
    b["token_mask"][:] = True
    b["features"] = np.random.default_rng(1).standard_normal((2, n_seg, 8, cfg.hidden_size)).astype(np.float32)
    both, first = b["loss_mask"].copy(), b["loss_mask"].copy()
    both[:, -1, 4:6], first[:, -1, 4] = 1.0, 1.0

    @partial(jax.jit, static_argnums=0)
    def grads(m, params, lmask):
        return jax.value_and_grad(lambda p: forward_segments(p, frozen, {**b, "loss_mask": lmask}, cfg, m).loss)(
            params)

    return grads, both, first


@pytest.mark.parametrize("hidden", [0, 16])
def test_later_read_map_is_trained_by_the_later_targets_alone(hidden):
    """memory.later_read_map (read_grad_targets=1): W_l (hidden=0; an MLP of its own if > 0) gets gradient from the
    second answer target only, the first target's loss and everything the read contributes are as without it
    (W_l sees a stop-gradiented read)."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", sparsity_weight=0.0, entropy_weight=0.0, token_gate=True,
                        read_grad_targets=1, later_read_map=True, later_read_hidden=hidden)
    mem = perturbed_memory(cfg, mcfg)
    grads, both, first = _two_target_grads(cfg, frozen, n_seg=2)

    (loss_both, g_both), (loss_first, g_first) = grads(mcfg, mem, both), grads(mcfg, mem, first)
    plain_cfg = mcfg.replace(later_read_map=False, later_read_hidden=0)
    plain = {k: v for k, v in mem.items() if k != "inject_later"}
    (plain_both, _), (plain_first, _) = grads(plain_cfg, plain, both), grads(plain_cfg, plain, first)
    assert float(loss_first) == float(plain_first) and abs(float(loss_both) - float(plain_both)) > 1e-4
    largest = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))  # noqa: E731
    assert largest(g_first["inject_later"]) == 0.0
    assert largest(g_both["inject_later"]) > 1e-4
    for name in ("slot_keys", "decoder", "encoder", "read_q", "write_v", "inject_read", "slots"):
        jax.tree.map(lambda a, f: np.testing.assert_allclose(np.asarray(a), 0.5 * np.asarray(f), rtol=2e-4,
                                                             atol=1e-7), g_both[name], g_first[name])
    with pytest.raises(GmemError, match="later_read_map needs read_grad_targets > 0"):
        mcfg.replace(read_grad_targets=-1)
    with pytest.raises(GmemError, match="set later_read_map=True"):
        mcfg.replace(later_read_map=False, later_read_hidden=8)


ADDRESSING = ("slot_keys", "read_q", "write_k", "write_strength", "gate", "importance_mlp")
CONTENT = ("write_v", "write_o", "decoder", "slots", "encoder")


@pytest.mark.parametrize("own_decoder", [False, True])
def test_later_train_content_trains_what_is_stored_but_not_where(own_decoder):
    """memory.later_train_content (read_grad_targets=1): the second answer target adds gradient to what the memory
    stores and decodes (CONTENT) but none to where facts go or are looked up (ADDRESSING); the loss and the first
    target's gradients are those of the same config without the option. With later_read_map (own_decoder) the
    second target reaches the content through its own decoder only: none to the shared decoder or read map, and
    its own decoder's gradient is later_read_map's alone."""
    cfg, frozen = tiny_backbone("llama")
    extra = dict(later_read_map=True, later_read_hidden=16) if own_decoder else {}
    mcfg = small_memory("final", write_attention="keyed", sparsity_weight=0.0, entropy_weight=0.0, token_gate=True,
                        read_grad_targets=1, later_train_content=True, **extra)
    mem = perturbed_memory(cfg, mcfg)
    grads, both, first = _two_target_grads(cfg, frozen, n_seg=3)
    (loss_both, g_both), (loss_first, g_first) = grads(mcfg, mem, both), grads(mcfg, mem, first)
    plain = mcfg.replace(later_train_content=False)
    (plain_both, g_plain_both), (plain_first, g_plain_first) = grads(plain, mem, both), grads(plain, mem, first)
    np.testing.assert_allclose(float(loss_both), float(plain_both), rtol=1e-6)
    np.testing.assert_allclose(float(loss_first), float(plain_first), rtol=1e-6)
    close = lambda a, f: np.testing.assert_allclose(np.asarray(a), np.asarray(f), rtol=2e-4, atol=1e-7)  # noqa: E731
    jax.tree.map(close, g_first, g_plain_first)
    shared_decoding = ("decoder", "inject_read") if own_decoder else ()
    content = tuple(n for n in CONTENT if n not in shared_decoding)
    for name in ADDRESSING + shared_decoding:  # the loss is a mean over targets: the first target's share halves
        jax.tree.map(lambda a, f: close(a, 0.5 * f), g_both[name], g_first[name])
    if own_decoder:
        jax.tree.map(close, g_both["inject_later"], g_plain_both["inject_later"])
    largest = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))  # noqa: E731
    for name in content:  # without the option: halved as well; with it, the second target adds
        jax.tree.map(lambda a, f: close(a, 0.5 * f), g_plain_both[name], g_first[name])
        gap = largest(jax.tree.map(lambda a, f: a - 0.5 * f, g_both[name], g_first[name]))
        assert gap > 1e-4 * largest(g_first[name]), name
    with pytest.raises(GmemError, match="later_train_content needs"):
        mcfg.replace(write_attention="tokens")
    with pytest.raises(GmemError, match="set later_read_hidden > 0"):
        mcfg.replace(later_read_map=True, later_read_hidden=0)


@pytest.mark.parametrize("scope", ["read", "all"])
def test_token_gate_scales_only_what_was_read(scope):
    """memory.token_gate: h' = h + W_h h + b + sigmoid(v.[h; r] + c) W_r r (token_gate_scope="read") or
    h' = h + sigmoid(v.[h; r] + c) (W_h h + b + W_r r) ("all"), the identity at init; checked against the formula
    in numpy. A shut gate leaves W_h h + b in place with "read", and exactly h with "all"."""
    mcfg = small_memory("final", token_gate=True, token_gate_scope=scope)
    H = 12
    module = GMemory(mcfg, H)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, H)), jnp.ones((1, 2), bool))["params"]
    rng = np.random.default_rng(0)
    h, r = rng.standard_normal((2, 3, 5, H)).astype(np.float32)
    inject = lambda p: np.asarray(module.apply({"params": p}, h, r, method=GMemory.inject))  # noqa: E731
    np.testing.assert_array_equal(inject(params), h)
    wh, wr = rng.standard_normal((2, H, H)).astype(np.float32) * 0.3
    b, v = rng.standard_normal(H).astype(np.float32), rng.standard_normal((2 * H, 1)).astype(np.float32) * 0.3
    for c in (0.7, -60.0):  # an open-ish gate, and one shut (the memory's half vanishes, W_h h + b stays)
        p = {**params, "inject_fuse": {"kernel": wh, "bias": b}, "inject_read": {"kernel": wr},
             "inject_token_gate": {"kernel": v, "bias": np.array([c], np.float32)}}
        gate = 1.0 / (1.0 + np.exp(-(np.concatenate([h, r], -1) @ v + c)))
        if scope == "read":
            expected = h + h @ wh + b + gate * (r @ wr)
        else:
            expected = h + gate * (h @ wh + b + r @ wr)
        np.testing.assert_allclose(inject(p), expected, rtol=1e-5, atol=1e-5)
        if scope == "all" and c < 0:
            np.testing.assert_array_equal(inject(p), h)
    with pytest.raises(GmemError, match="token_gate_scope='all' needs token_gate=True"):
        mcfg.replace(token_gate=False, token_gate_scope="all")
    with pytest.raises(GmemError, match="token_gate_scope 'both' unknown"):
        mcfg.replace(token_gate_scope="both")
        _, reported = module.apply({"params": p}, h, r, method=GMemory._inject)  # the gate the metrics see
        np.testing.assert_allclose(np.asarray(reported), gate[..., 0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("write_attention", ["tokens", "keyed"])
def test_token_gate_match_sees_logsumexp_of_the_read_logits(write_attention):
    """memory.token_gate_match: g = sigmoid(v.[h; r; m] + c) with m = mean over heads of logsumexp(read logits) - log S.
    With v picking m alone (weight 1, c = 0) the gate read_and_inject reports is sigmoid(m), m recomputed in numpy
    from the module's own encoder, read query, addresses and importance; and the output is h + g (W_h h + b + W_r r)."""
    mcfg = small_memory("final", write_attention=write_attention, token_gate=True, token_gate_scope="all",
                        token_gate_match=True)
    H, S, nh = 12, mcfg.num_slots, mcfg.num_heads
    module = GMemory(mcfg, H)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, H)), jnp.ones((1, 2), bool))["params"]
    rng = np.random.default_rng(1)
    h = rng.standard_normal((2, 5, H)).astype(np.float32)
    state = rng.standard_normal((2, S, mcfg.mem_dim)).astype(np.float32)
    wh = rng.standard_normal((H, H)).astype(np.float32) * 0.3
    v = np.zeros((2 * H + 1, 1), np.float32)
    v[-1] = 1.0
    p = {**params, "inject_fuse": {"kernel": wh, "bias": np.zeros(H, np.float32)},
         "inject_token_gate": {"kernel": v, "bias": np.zeros(1, np.float32)}}
    call = lambda *a, method: module.apply({"params": p}, *a, method=method)  # noqa: E731
    out, _, gate = call(state, h, method=GMemory.read_and_inject)
    x = np.asarray(call(h, method=GMemory.encode), np.float64)
    bias = np.log(np.asarray(call(state, method=GMemory.importance), np.float64) + 1e-6)  # [B, S]
    if write_attention == "keyed":  # per head: the read query against that head's part of the slot addresses
        q = (x @ np.asarray(p["read_q"]["kernel"], np.float64) + np.asarray(p["read_q"]["bias"])).reshape(2, 5, nh, -1)
        keys = np.asarray(p["slot_keys"], np.float64).reshape(S, nh, -1)
        logits = np.einsum("bthd,shd->bths", q, keys) / np.sqrt(q.shape[-1]) + bias[:, None, None, :]
    else:
        logits = (np.einsum("btm,bsm->bts", x, state) / np.sqrt(mcfg.mem_dim) + bias[:, None, :])[:, :, None, :]
    top = logits.max(-1, keepdims=True)
    m = (np.log(np.exp(logits - top).sum(-1)) + top[..., 0] - np.log(S)).mean(-1)  # [B, T]
    expected_gate = 1.0 / (1.0 + np.exp(-m))
    np.testing.assert_allclose(np.asarray(gate), expected_gate, rtol=1e-4, atol=1e-6)
    r_part = np.asarray(out) - h - expected_gate[..., None] * (h @ wh)  # W_r = 0 at init: nothing from the read
    np.testing.assert_allclose(r_part, 0.0, atol=1e-4)
    with pytest.raises(GmemError, match="token_gate_match needs the read's match score"):
        call(h, h, method=GMemory.inject)
    with pytest.raises(GmemError, match="token_gate_match needs token_gate=True"):
        mcfg.replace(token_gate=False, token_gate_scope="read")


def test_read_gate_metric_is_the_token_gate_at_the_answer_positions():
    """metrics["read_gate"]: the token gate averaged over the loss positions; with v = 0 the gate is sigmoid(c)
    at every token, so the metric must be exactly that; with a gate that varies by token, the mean at exactly the
    loss positions. Without memory.token_gate there is no such metric."""
    cfg, frozen = tiny_backbone("llama")
    b = random_batch(cfg, B=2, N=3, T=8)
    mcfg = small_memory("final", token_gate=True)
    mem = perturbed_memory(cfg, mcfg)
    for c in (0.0, 1.5):
        p = {**mem, "inject_token_gate": {"kernel": np.zeros_like(mem["inject_token_gate"]["kernel"]),
                                          "bias": np.array([c], np.float32)}}
        got = float(forward_segments(p, frozen, b, cfg, mcfg).metrics["read_gate"])
        np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-c)), rtol=1e-6)
    # a gate that varies by token, and a loss on the last segment only: the mean of the gate the last segment's
    # forward reports (reading what the earlier segments wrote) over exactly the loss positions
    b["loss_mask"][:, :-1] = 0.0
    b["loss_mask"][:, -1] = np.array([[0, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0, 0, 0]], np.float32)
    state = write_context(mem, frozen, b["tokens"][:, :-1], b["token_mask"][:, :-1], cfg, mcfg)
    out = forward(frozen, b["tokens"][:, -1], cfg, kv_mask=b["token_mask"][:, -1], compute_logits=False,
                  **memory_hooks(mem, state, cfg, mcfg, frozen))
    gate = np.asarray(out.final_aux[2])
    assert gate.std() > 1e-3  # the check below could not tell positions apart otherwise
    got = float(forward_segments(mem, frozen, b, cfg, mcfg).metrics["read_gate"])
    np.testing.assert_allclose(got, gate[b["loss_mask"][:, -1] > 0].mean(), rtol=1e-5)
    plain = small_memory("final")
    assert "read_gate" not in forward_segments(perturbed_memory(cfg, plain), frozen, b, cfg, plain).metrics


@pytest.mark.parametrize("n, expected", [
    (1, [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]), (2, [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]),
    (-1, [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]), (-2, [[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]])])
def test_read_grad_targets_picks_the_later_or_the_last_targets(n, expected):
    """Which loss targets read_grad_targets = n detaches: after the first n (n > 0), the last -n (n < 0)."""
    from gmem_jax.memory.model import _later_targets

    loss_mask = jnp.array([[0, 1, 1, 1, 0], [1, 0, 0, 0, 1]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(_later_targets(loss_mask, n)), np.array(expected, bool))
    assert _later_targets(loss_mask, 0) is None
