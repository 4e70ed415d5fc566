"""Autoregressive generation with a preallocated KV cache: one jitted prefill + `lax.while_loop` decode.

Layout of a batch: prompts are LEFT-padded [B, P] with a bool mask; every call feeds a block of tokens into the
cache at the shared `cache_index` (so rows stay aligned), with per-row positions = next_position +
cumsum(mask) - 1 (what transformers does for left padding) and `kv_mask` marking which cache slots hold real
tokens. After a row emits an EOS / stop id it keeps being stepped (static shapes) but its slots are masked out,
its position stops advancing and its output is padded; the loop exits early once every row has stopped.

The last sampled token of each row is not yet in the cache: `DecodeState.last_token` holds it, and `extend`
feeds it first, followed by new tokens (e.g. a memory-query result spliced in after a stop id), then continues
decoding into the same cache. Nothing of the prompt is ever recomputed.

`hooks` (static) maps (`hook_state` (a traced pytree), `decode_step` ([] int32: 0 for the block fed first, k for
the k-th generated token fed back)) to the extra `forward` keyword arguments (layer_hook / hook_layer /
final_hook): every prefilled and decoded token goes through them. The step lets a hook act differently on the
answer's later tokens (memory.later_read_map).

The feed (prefill) runs the layer scan over the stacked params. The decode loop, by default on XLA:CPU (for
8+ new tokens), runs on per-layer copies of the layer weights and cache made once per call
(`model.unstack_layers`): there the scan's dynamic index copies each layer's weights at every token, which
made one-token steps ~1.7x slower. Params whose layers are already per-layer (a caller that generates many
times unstacks once) skip that copy: the feed and the decode then both run the layer loop.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import forward, init_cache, lm_logits, stack_layers, unstack_layers
from gmem_jax.errors import GmemError

Hooks = Callable[[Any, jax.Array], dict]  # (hook_state, decode_step) -> dict(layer_hook=, hook_layer=, final_hook=)

# Unstacking the layer weights costs about what 5 decoded tokens save (GPT-2-124M on XLA:CPU: ~130 ms once per
# call, copy and fresh pages, vs ~30 ms per token; both scale with the weight bytes): do it for longer decodes.
PER_LAYER_MIN_NEW_TOKENS = 8


class DecodeState(NamedTuple):
    cache: dict  # {'k','v': [L, B, S, K, E]}
    cache_index: jax.Array  # [] int32: next free cache slot (shared by all rows)
    kv_mask: jax.Array  # [B, S] bool: slots holding real tokens
    next_position: jax.Array  # [B] int32: position the pending token will get
    last_token: jax.Array  # [B] int32: last generated token, not yet in the cache (fed first by `extend`)


class GenerationResult(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] int32, padded with pad_id after a row stopped
    lengths: jax.Array  # [B] int32: generated tokens per row, including the EOS / stop id that ended it
    stopped: jax.Array  # [B] bool: the row ended with an EOS / stop id (False: it hit max_new_tokens)
    state: DecodeState  # for `extend`


def empty_state(cfg: BackboneConfig, batch: int, cache_len: int) -> DecodeState:
    """A fresh cache of `cache_len` slots with nothing in it."""
    return DecodeState(
        cache=init_cache(cfg, batch, cache_len),
        cache_index=jnp.zeros((), jnp.int32),
        kv_mask=jnp.zeros((batch, cache_len), bool),
        next_position=jnp.zeros((batch,), jnp.int32),
        last_token=jnp.zeros((batch,), jnp.int32),
    )


def sample_token(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *, greedy: bool
                 ) -> jax.Array:
    """logits [B, V] -> token ids [B] int32. Greedy argmax, or sampling from softmax(logits / temperature)
    restricted to the nucleus: the most likely tokens whose cumulative probability reaches top_p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # a token is in the nucleus if the mass strictly before it is < top_p (so the top token always is)
    in_nucleus = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _feed(params, cfg, state: DecodeState, tokens, mask, hooks, hook_state, decode_step):
    """Write tokens [B, T] (mask [B, T]) into the cache; return (new state, logits [B, V] at each row's last
    real token). decode_step [] int32: passed to `hooks`."""
    B, T = tokens.shape
    positions = jnp.maximum(state.next_position[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
    kv_mask = jax.lax.dynamic_update_slice(state.kv_mask, mask, (0, state.cache_index))
    out = forward(params, tokens, cfg, positions=positions, kv_mask=kv_mask, cache=state.cache,
                  cache_index=state.cache_index, compute_logits=False,
                  **(hooks(hook_state, decode_step) if hooks else {}))
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # the last True column (left or right padding)
    logits = lm_logits(params, out.hidden[jnp.arange(B), last], cfg)  # only the positions we sample from
    new_state = DecodeState(out.cache, state.cache_index + T, kv_mask,
                            state.next_position + mask.sum(axis=1, dtype=jnp.int32), state.last_token)
    return new_state, logits


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "hooks", "greedy", "pad_id", "per_layer"),
                   donate_argnames=("state",))
def _run(params, hook_state, state, tokens, mask, rng, temperature, top_p, stop_set, *, cfg, max_new_tokens,
         hooks, greedy, pad_id, per_layer):
    """Feed tokens [B, T] into the cache, then decode up to max_new_tokens (the first from the feed's logits).
    per_layer: decode on per-layer copies of params['layers'] and the cache (see the module docstring).
    params['layers'] given per-layer (a tuple): the feed and the decode both run on it as it is."""
    B = tokens.shape[0]
    given_per_layer = isinstance(params["layers"], tuple)
    if given_per_layer:  # the weights are already laid out for decoding: only the (small) cache is unstacked
        state = state._replace(cache=unstack_layers(state.cache))

    def is_stop(t):  # [B] -> [B] bool
        return (t[:, None] == stop_set[None, :]).any(-1)

    state, logits = _feed(params, cfg, state, tokens, mask, hooks, hook_state, jnp.int32(0))
    rng, sub = jax.random.split(rng)
    tok = sample_token(logits, sub, temperature, top_p, greedy=greedy)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    decode_params = params
    if per_layer and not given_per_layer:  # one copy of the layer weights per call instead of one per decoded token
        decode_params = dict(params, layers=unstack_layers(params["layers"]))
        state = state._replace(cache=unstack_layers(state.cache))
    init = (state._replace(last_token=tok), out, jnp.ones((B,), jnp.int32), is_stop(tok), rng, jnp.int32(1))

    def cond(carry):
        *_, done, _, step = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        state, out, lengths, done, rng, step = carry
        active = ~done
        # stopped rows still run (static shapes) but their slot is masked and their position does not advance
        state, logits = _feed(decode_params, cfg, state, state.last_token[:, None], active[:, None], hooks,
                              hook_state, step)  # feeds the step-th generated token
        rng, sub = jax.random.split(rng)
        tok = sample_token(logits, sub, temperature, top_p, greedy=greedy)
        out = out.at[:, step].set(jnp.where(active, tok, pad_id))
        state = state._replace(last_token=jnp.where(active, tok, state.last_token))
        return state, out, lengths + active, done | (active & is_stop(tok)), rng, step + 1

    state, out, lengths, done, _, _ = jax.lax.while_loop(cond, step_fn, init)
    if per_layer or given_per_layer:  # DecodeState keeps the stacked [L, B, S, K, E] cache, for `extend`'s feed
        state = state._replace(cache=stack_layers(state.cache))
    return GenerationResult(out, lengths, done, state)


def _stop_set(cfg: BackboneConfig, eos_ids, stop_ids) -> jax.Array:
    ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids) + tuple(stop_ids or ())
    return jnp.asarray(ids or (-1,), jnp.int32)  # -1 never matches: no stopping


def _check_block(cfg, tokens, mask, what: str):
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise GmemError(f"{what} tokens {list(tokens.shape)} and mask {list(mask.shape)} must both be [batch, len]")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise GmemError(f"{what} tokens have dtype {tokens.dtype}; pass integer token ids")
    real = tokens[mask.astype(bool)]
    if real.size and (real.min() < 0 or real.max() >= cfg.vocab_size):
        raise GmemError(f"{what} token ids span [{real.min()}, {real.max()}] outside the vocabulary "
                        f"[0, {cfg.vocab_size}); the tokenizer does not match the model")


def _decode_call(params, cfg, state, tokens, mask, cache_index: int, max_position: int, *, max_new_tokens, rng,
                 temperature, top_p, eos_ids, hooks, hook_state, stop_ids, pad_id, per_layer_decode):
    """Validate the host-side arguments once, then run the jitted feed + decode loop."""
    if max_new_tokens < 1:
        raise GmemError(f"max_new_tokens={max_new_tokens}; it must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GmemError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise GmemError("sampling (temperature > 0) needs an rng key, e.g. rng=jax.random.key(seed)")
    S, T = state.kv_mask.shape[1], tokens.shape[1]
    if cache_index + T + max_new_tokens - 1 > S:
        raise GmemError(f"the KV cache has {S} slots, {cache_index} used; {T} new tokens + {max_new_tokens} "
                        f"generated do not fit: pass a larger cache_len to generate")
    if cfg.arch == "gpt2" and max_position + T + max_new_tokens - 1 > cfg.max_position_embeddings:
        raise GmemError(f"{max_position + T + max_new_tokens - 1} positions exceed GPT-2's "
                        f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or max_new_tokens")
    if pad_id is None:
        eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    if isinstance(params["layers"], tuple):  # already per-layer: the flag changes nothing, so keep one compile
        per_layer_decode = False
    elif per_layer_decode is None:  # measured on XLA:CPU only; elsewhere it would just hold a 2nd weight copy
        per_layer_decode = jax.default_backend() == "cpu" and max_new_tokens >= PER_LAYER_MIN_NEW_TOKENS
    return _run(params, hook_state, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
                jax.random.key(0) if rng is None else rng, jnp.float32(max(temperature, 1e-6)),
                jnp.float32(top_p), _stop_set(cfg, eos_ids, stop_ids), cfg=cfg, max_new_tokens=int(max_new_tokens),
                hooks=hooks, greedy=greedy, pad_id=int(pad_id), per_layer=bool(per_layer_decode))


def generate(
    params: dict,
    cfg: BackboneConfig,
    prompt_tokens,
    prompt_mask,
    *,
    max_new_tokens: int,
    rng: Optional[jax.Array] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Optional[Sequence[int]] = None,
    hooks: Optional[Hooks] = None,
    hook_state: Any = None,
    stop_ids: Optional[Sequence[int]] = None,
    cache_len: Optional[int] = None,
    pad_id: Optional[int] = None,
    per_layer_decode: Optional[bool] = None,
) -> GenerationResult:
    """Generate up to max_new_tokens after left-padded prompts.

    prompt_tokens [B, P] int, prompt_mask [B, P] bool (True = real token; each row needs one). temperature 0 is
    greedy; otherwise sample with `rng` and nucleus `top_p`. eos_ids (default cfg.eos_token_ids; () = never stop)
    and stop_ids end a row (the id is reported in `tokens` and counted in `lengths`). hooks/hook_state: see
    module docstring; `hooks` is a static jit argument, so pass the same function object each call.
    cache_len: KV-cache slots (default P + max_new_tokens); make it larger to `extend` later.
    pad_id: fills rows after they stop (default cfg.pad_token_id, else the first eos id, else 0).
    per_layer_decode: decode on per-layer copies of the layer weights and cache, made once per call (holds a
    second copy of the layer weights meanwhile, and costs about 5 tokens' worth of time once); default: on the
    CPU backend when max_new_tokens >= PER_LAYER_MIN_NEW_TOKENS, where it is ~1.6x faster per token.
    To pay the copy once rather than per call, pass params with params['layers'] = model.unstack_layers(
    params['layers']) (and drop the stacked tree): prefill and decode then run on it and per_layer_decode is moot.
    """
    _check_block(cfg, prompt_tokens, prompt_mask, "prompt")
    B, P = np.shape(prompt_tokens)
    if not np.asarray(prompt_mask).any(axis=1).all():
        raise GmemError("a prompt row has no real tokens (its mask is all False); give every row a prompt")
    state = empty_state(cfg, B, cache_len or P + max_new_tokens)
    return _decode_call(params, cfg, state, prompt_tokens, prompt_mask, 0, 0, max_new_tokens=max_new_tokens,
                        rng=rng, temperature=temperature, top_p=top_p, eos_ids=eos_ids, hooks=hooks,
                        hook_state=hook_state, stop_ids=stop_ids, pad_id=pad_id, per_layer_decode=per_layer_decode)


def extend(
    params: dict,
    cfg: BackboneConfig,
    state: DecodeState,
    new_tokens,
    new_mask=None,
    *,
    max_new_tokens: int,
    rng: Optional[jax.Array] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Optional[Sequence[int]] = None,
    hooks: Optional[Hooks] = None,
    hook_state: Any = None,
    stop_ids: Optional[Sequence[int]] = None,
    pad_id: Optional[int] = None,
    per_layer_decode: Optional[bool] = None,
) -> GenerationResult:
    """Continue from `state` (consumed: its cache buffers are donated): feed each row's pending last token, then
    new_tokens [B, N] (mask [B, N], default all True; N may be 0), then decode up to max_new_tokens more.
    Every row restarts decoding, including rows that had stopped. per_layer_decode: as in `generate`."""
    B = state.last_token.shape[0]
    new_tokens = np.asarray(new_tokens, np.int32).reshape(B, -1)
    new_mask = np.ones(new_tokens.shape, bool) if new_mask is None else np.asarray(new_mask, bool)
    _check_block(cfg, new_tokens, new_mask, "new")
    tokens = jnp.concatenate([state.last_token[:, None], jnp.asarray(new_tokens)], axis=1)
    mask = jnp.concatenate([jnp.ones((B, 1), bool), jnp.asarray(new_mask)], axis=1)
    return _decode_call(params, cfg, state, tokens, mask, int(state.cache_index), int(state.next_position.max()),
                        max_new_tokens=max_new_tokens, rng=rng, temperature=temperature, top_p=top_p,
                        eos_ids=eos_ids, hooks=hooks, hook_state=hook_state, stop_ids=stop_ids, pad_id=pad_id,
                        per_layer_decode=per_layer_decode)
