"""KV-cache generation against transformers' generate and a cache-free reference decoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax import generation
from gmem_jax.backbones.loading import load_backbone
from gmem_jax.backbones.model import (embed, final_norm, forward, init_cache, lm_logits, run_layers, stack_layers,
                                      unstack_layers)
from gmem_jax.errors import GmemError
from gmem_jax.generation import extend, generate, sample_token
from hf_oracle import hf_greedy


def left_pad(prompts, pad=0):
    P = max(map(len, prompts))
    tokens = np.full((len(prompts), P), pad, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):], mask[b, P - len(p):] = p, True
    return tokens, mask


def random_prompts(lengths, vocab=256, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(2, vocab, n).tolist() for n in lengths]


def row(result, b):
    return np.asarray(result.tokens[b, : int(result.lengths[b])]).tolist()


@pytest.fixture(scope="module")
def llama(llama_dir):
    path, model = llama_dir
    cfg, params = load_backbone(path)
    return cfg, params, model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_32_tokens_equal_transformers(arch, gpt2_dir, llama_dir, highest_precision):
    path, model = gpt2_dir if arch == "gpt2" else llama_dir
    cfg, params = load_backbone(path)
    prompt = random_prompts([8], seed=1)[0]
    tokens, mask = left_pad([prompt])
    out = generate(params, cfg, tokens, mask, max_new_tokens=32, eos_ids=())
    assert out.tokens.shape == (1, 32) and int(out.lengths[0]) == 32 and not bool(out.stopped[0])
    assert row(out, 0) == hf_greedy(model, prompt, 32)


def test_batched_left_padded_equals_per_prompt(llama, highest_precision):
    cfg, params, model = llama
    prompts = random_prompts([5, 11, 8], seed=2)
    out = generate(params, cfg, *left_pad(prompts), max_new_tokens=32, eos_ids=())
    for b, p in enumerate(prompts):
        assert row(out, b) == hf_greedy(model, p, 32), b


def test_decode_step_compiles_once(llama):
    cfg, params, _ = llama
    traces = []

    def counting_hooks(_state, _decode_step):  # called once per trace of the prefill and of the decode step
        traces.append(1)
        return {}

    before = generation._run._cache_size()
    for seed in (3, 4, 5):
        generate(params, cfg, *left_pad(random_prompts([6, 6], seed=seed)), max_new_tokens=12, eos_ids=(),
                 hooks=counting_hooks)
    assert len(traces) == 2 and generation._run._cache_size() == before + 1
    # sampling settings are traced values: new temperatures / top_p / seeds reuse one sampling compile
    for t, p, s in ((0.7, 0.9, 0), (1.3, 0.5, 1)):
        generate(params, cfg, *left_pad(random_prompts([6, 6])), max_new_tokens=12, eos_ids=(),
                 hooks=counting_hooks, temperature=t, top_p=p, rng=jax.random.key(s))
    assert len(traces) == 4 and generation._run._cache_size() == before + 2


def naive_greedy(params, cfg, prompt, n, hooks=None, hook_state=None, length=24):
    """Cache-free reference: re-run the whole sequence for every new token. The sequence lives right-padded in
    a fixed [1, length] buffer (causal attention never looks right), so there is one compile per hooks."""
    run = jax.jit(lambda p, toks, s: forward(p, toks, cfg, **(hooks(s) if hooks else {})).logits)
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(jnp.argmax(run(params, buf, hook_state)[0, i - 1]))
    return buf[0, len(prompt): len(prompt) + n].tolist()


def test_hooks_apply_to_prefill_and_every_decoded_token(llama, highest_precision):
    cfg, params, _ = llama
    rs = np.random.RandomState(0)
    state = {"delta": jnp.asarray(rs.normal(size=cfg.hidden_size), jnp.float32),
             "scale": jnp.asarray(rs.uniform(0.5, 2.0, size=cfg.hidden_size), jnp.float32)}

    def hooks(s, decode_step=None):  # the same hooks at every step
        return dict(layer_hook=lambda h: (h + s["delta"], None), hook_layer=1,
                    final_hook=lambda h: (h * s["scale"], None))

    prompts = random_prompts([4, 7], seed=6)
    out = generate(params, cfg, *left_pad(prompts), max_new_tokens=8, eos_ids=(), hooks=hooks, hook_state=state)
    for b, p in enumerate(prompts):
        ref = naive_greedy(params, cfg, p, 8, hooks, state)
        assert row(out, b) == ref
        assert ref != naive_greedy(params, cfg, p, 8)  # the hooks really change the continuation


@pytest.mark.parametrize("layers", [(0, 1), (1, 1)])
def test_several_layer_hooks_apply_in_order_at_their_layers(llama, highest_precision, layers):
    """layer_hook / hook_layer as tuples: each hook sees the residual stream entering its block after the earlier
    hooks' changes (the same block twice: in the order given); layer_aux is the tuple of their auxes. Oracle: the
    blocks run by hand between the hooks."""
    cfg, params, _ = llama
    assert cfg.num_layers > max(layers)  # a block above the last hook still runs
    rs = np.random.RandomState(4)
    delta = jnp.asarray(rs.normal(size=cfg.hidden_size), jnp.float32)
    tokens = jnp.asarray(random_prompts([6, 6], seed=3))
    hooks = (lambda h: (h + delta, h), lambda h: (1.5 * h, h))
    out = forward(params, tokens, cfg, layer_hook=hooks, hook_layer=layers)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    run = lambda h, a, b: run_layers(params, h, cfg, a, b, positions=positions,  # noqa: E731
                                     kv_mask=jnp.ones((2, 6), bool))[0]
    h0 = run(embed(params, tokens, positions, cfg), 0, layers[0])
    h1 = run(h0 + delta, layers[0], layers[1])
    ref = lm_logits(params, final_norm(params, run(1.5 * h1, layers[1], cfg.num_layers), cfg), cfg)
    np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.layer_aux[0], h0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.layer_aux[1], h1, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out.logits) - np.asarray(forward(params, tokens, cfg).logits)).max() > 1e-2
    with pytest.raises(ValueError, match="not non-decreasing"):
        forward(params, tokens, cfg, layer_hook=hooks, hook_layer=layers[::-1] if layers[0] != layers[1] else (1, 0))
    with pytest.raises(ValueError, match="one layer per hook"):
        forward(params, tokens, cfg, layer_hook=hooks, hook_layer=(1,))


def test_per_layer_layout_equals_the_layer_scan(llama, highest_precision):
    """The decode layout (params['layers'] and the cache unstacked, a loop over static layer indices) gives the
    scan's logits and cache, for a prefill and a one-token step, both split by a layer hook; and generate /
    extend emit the same tokens with per_layer_decode on and off."""
    cfg, params, _ = llama
    per_layer = dict(params, layers=unstack_layers(params["layers"]))
    hook = dict(layer_hook=lambda h: (1.5 * h, None), hook_layer=1)
    tokens = jnp.asarray(random_prompts([7], seed=9))
    scan = forward(params, tokens[:, :6], cfg, cache=init_cache(cfg, 1, 8), **hook)
    loop = forward(per_layer, tokens[:, :6], cfg, cache=unstack_layers(init_cache(cfg, 1, 8)), **hook)
    # 1e-5: the same fp32 ops, but XLA fuses (rounds) the unrolled blocks and the scanned one differently
    for _ in range(2):  # the prefill (6 tokens), then one decode step into the same caches
        np.testing.assert_allclose(loop.logits, scan.logits, rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     stack_layers(loop.cache), scan.cache)
        scan = forward(params, tokens[:, 6:], cfg, cache=scan.cache, cache_index=6, **hook)
        loop = forward(per_layer, tokens[:, 6:], cfg, cache=loop.cache, cache_index=6, **hook)

    prompts, new = random_prompts([4, 7], seed=10), [[5, 6], [7, 8]]
    hook_kw = dict(hooks=lambda _state, _step: hook)  # splits the prefill's layer loop too
    runs = []
    # per-layer decode copies made per call, the layer scan throughout, and params unstacked once by the caller
    for p, on in ((params, True), (params, False), (per_layer, None)):
        out = generate(p, cfg, *left_pad(prompts), max_new_tokens=8, eos_ids=(), cache_len=24, per_layer_decode=on,
                       **hook_kw)
        tokens_out = np.asarray(out.tokens)
        cont = extend(p, cfg, out.state, *left_pad(new), max_new_tokens=6, eos_ids=(), per_layer_decode=on,
                      **hook_kw)
        assert cont.state.cache["k"].shape[0] == cfg.num_layers  # the state's cache is stacked in every layout
        runs.append((tokens_out, np.asarray(cont.tokens), cont.state.cache))
    tok_a, cont_a, cache_a = runs[0]
    for tok_b, cont_b, cache_b in runs[1:]:
        assert np.array_equal(tok_a, tok_b) and np.array_equal(cont_a, cont_b)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), cache_a, cache_b)


@pytest.mark.parametrize("kind", ["eos_ids", "stop_ids"])
def test_stop_pads_row_then_extend_continues(llama, kind, highest_precision):
    """Rows stop at a stop/EOS id (reported, then padded), the loop exits once all rows stopped, and `extend`
    splices new tokens after the stop id and continues exactly like greedy decoding of the whole sequence."""
    cfg, params, model = llama
    prompts = random_prompts([6, 9], seed=7)
    tokens, mask = left_pad(prompts)
    free = generate(params, cfg, tokens, mask, max_new_tokens=16, eos_ids=(), cache_len=64)
    rows = [row(free, b) for b in range(2)]
    # for each row, a token it first emits at some step k >= 3: every row will stop
    stops = [next(r[k] for k in range(3, 16) if r[k] not in r[:k]) for r in rows]
    kw = {"eos_ids": stops} if kind == "eos_ids" else {"eos_ids": (), "stop_ids": stops}
    out = generate(params, cfg, tokens, mask, max_new_tokens=16, pad_id=255, cache_len=64, **kw)
    lengths = [next(i for i, t in enumerate(r) if t in stops) + 1 for r in rows]
    for b in range(2):
        n = lengths[b]
        assert row(out, b) == rows[b][:n] and int(out.lengths[b]) == n and bool(out.stopped[b])
        assert np.all(np.asarray(out.tokens[b, n:]) == 255)
    assert max(lengths) < 16 and int(out.state.cache_index) == tokens.shape[1] + max(lengths) - 1  # early exit
    new = [[5, 6, 7], [8, 9]]
    cont = extend(params, cfg, out.state, *left_pad(new), max_new_tokens=6, eos_ids=())
    for b in range(2):
        history = prompts[b] + row(out, b) + new[b]
        assert row(cont, b) == hf_greedy(model, history, 6), b


def test_cache_overflow_and_position_limits_are_clear_errors(llama, gpt2_dir, highest_precision):
    cfg, params, _ = llama
    # shapes and precision as in test_greedy_32_tokens_equal_transformers[llama] (no new compile): 40 slots, 39 used
    out = generate(params, cfg, *left_pad(random_prompts([8], seed=1)), max_new_tokens=32, eos_ids=())
    with pytest.raises(GmemError, match="KV cache has 40 slots, 39 used"):
        extend(params, cfg, out.state, [[1, 2]], max_new_tokens=4)
    gcfg, gparams = load_backbone(gpt2_dir[0])
    with pytest.raises(GmemError, match="max_position_embeddings=128"):
        generate(gparams, gcfg, *left_pad([list(range(2, 102))]), max_new_tokens=40)
    with pytest.raises(GmemError, match="outside the vocabulary"):
        generate(params, cfg, *left_pad([[3, 300]]), max_new_tokens=2)
    with pytest.raises(GmemError, match="needs an rng"):
        generate(params, cfg, *left_pad([[3]]), max_new_tokens=2, temperature=0.5)


def test_nucleus_sampling_distribution():
    """Empirical frequencies of sample_token vs the renormalised top-p distribution computed by hand."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5], np.float32)
    temperature, top_p = 0.8, 0.7
    p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]  # smallest prefix reaching top_p
    expected = np.zeros_like(p)
    expected[keep] = p[keep] / p[keep].sum()
    n = 20000
    draw = jax.jit(jax.vmap(lambda k: sample_token(jnp.asarray(logits)[None], k, temperature, top_p, greedy=False)[0]))
    samples = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
    freq = np.bincount(samples, minlength=len(logits)) / n
    assert set(np.nonzero(freq)[0]) == set(keep)
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(llama, highest_precision):
    cfg, params, _ = llama
    tokens, mask = left_pad(random_prompts([5, 11, 8], seed=8))  # greedy compile shared with the batched test
    kw = dict(max_new_tokens=32, eos_ids=(), temperature=1.0)
    a = generate(params, cfg, tokens, mask, rng=jax.random.key(1), **kw)
    b = generate(params, cfg, tokens, mask, rng=jax.random.key(1), **kw)
    c = generate(params, cfg, tokens, mask, rng=jax.random.key(2), **kw)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)
    nucleus_of_one = generate(params, cfg, tokens, mask, rng=jax.random.key(1), top_p=1e-6, **kw)
    greedy = generate(params, cfg, tokens, mask, max_new_tokens=32, eos_ids=())
    assert np.array_equal(nucleus_of_one.tokens, greedy.tokens)
