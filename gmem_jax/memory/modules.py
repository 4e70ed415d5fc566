"""G-MemLLM memory as one Flax Linen module with one method per operation.

Shapes: B batch, T tokens in a segment, S memory slots, M memory dim, H backbone hidden size, N sentences.
The memory never sees backbone internals: it takes hidden states [B, T, H] and returns hidden states.

    encode:  E(h) = Linear(H->2M) -> LayerNorm -> GELU -> Linear(2M->M)            [B, T, H] -> [B, T, M]
             (standardize_inputs: h -> (h - mu) * inv_sigma first, per channel, one pair per read / write side)
    decode:  D(x) = Linear(M->H) -> LayerNorm -> GELU -> Linear(H->H)              [B, T, M] -> [B, T, H]
    write:   A = MHA(query=Mem, key=value=E(h), padding-masked)                    [B, S, M]
             (write_attention="slots": softmax over slots per token, A_s = mean of the tokens slot s won,
              and the gate below is scaled by w_s = min(1, tokens won by s);
              write_attention="keyed": the same, but tokens are matched to fixed learned slot addresses K [S, M]
              instead of the slots' contents, each token's share is scaled by a learned strength sigmoid(u.x_t),
              w_s = won_s / max won (per head), and the read below uses those addresses too;
              write_recency: in A_s, token t's share also weighs exp(beta (t - t_last) / (T - 1)), beta learned;
              write_key_window = w: token t's key is sum_j c_j k_(t-j), j < w, c learned, (1, 0, ...) at init
              (write_key_mix_init="uniform": 1/w each); write_key_select: instead k'_t = sum_j a_tj k_(t-j),
              a_t = softmax_j(c_j + u.k_(t-j) / sqrt(M/heads)) over the real tokens of the window, u learned, 0 at init,
              so a token's address can come from whichever token of its window (a name) the query u picks out;
              address_scale: the slot-address logits, here and in the read, are multiplied by a fixed factor;
              write_key_source="final": keys (and keyed strengths) from E(final hidden states), values from E(h);
              write_value_shift: token t's key carries token t + 1's value;
              address_oracle: the address logits of a token get a bias on its entity's slot block, a diagnostic)
             update gate: g = sigmoid(W[Mem; A] + b);  Mem' = g*A + (1-g)*Mem
             (provenance, memory.pointer_weight: P [B, S, T] = mean_channels(g) * mean_heads(token t's content
              weight in slot s), the share of slot s's new content that is token t's value)
             gru gate:    z, rg = sigmoid(W[Mem; A] + b); c = tanh(Wc[rg*Mem; A]); Mem' = z*c + (1-z)*Mem
    read:    alpha = softmax(E(h) Mem^T / sqrt(M) + log s) over slots;  r = D(alpha Mem)    [B, T, H]
             (keyed: alpha = softmax(Wq E(h) K^T / sqrt(M/heads) + log s) per head, on that head's part of Mem;
              read_written_only: per head, the softmax runs over the slots that head has written plus a null slot
              with learned logit n_h and value 0, so alpha sums to 1 - (the null's weight); read_by_content: the
              query is matched with each slot's content Mem_h instead of K; read_by_write_key: each head's part
              of a slot is [stored key; value], the write storing there the first half of the won tokens' write
              keys (mixed like the values), the query's first half matched with it and only the value half read)
    inject:  final:    h' = h + W[h; r] + b, W = 0, b = 0 at init (exactly the frozen model)
                       (token_gate: h' = h + W_h h + b + sigmoid(v.[h; r] + c) W_r r, W_h, W_r, b = 0 at init;
                        token_gate_scope="all": h' = h + sigmoid(v.[h; r] + c) (W_h h + b + W_r r);
                        token_gate_match: the gate's input also has m = mean_heads logsumexp(read logits) - log S;
                        later_read_map: the later answer targets add W_l sg(r) to what was read, W_l = 0 at init;
                        with later_read_hidden = k > 0 they add L(sg(alpha Mem)) instead, L an MLP M -> k -> H of
                        their own whose output layer is 0 at init;
                        inject_read_only: h' = h + W_r r, from an all-zero initial memory through a decoder with
                        no biases or LayerNorm, so reading nothing written injects exactly nothing;
                        scope_gate: h' = h + g (the whole update), one g per example and segment, below)
             residual: h' = h + g * r, g [H] = 0 at init (scope_gate: h' = h + g_scope g * r)
    importance: s = sigmoid(MLP(Mem)) per slot                                      [B, S]
    scope_gate: the state gains a row [B, S + 1, M] holding u = sum over written segments of unit(P x_seg), x_seg the
             segment's standardised mean final hidden state (residual injection: of the residual stream the read
             sees) (P: H -> M, no bias); a segment whose question vector
             q = unit(P x_q) (mean over its prompt) has g = sigmoid(a cos(q, u) + c), a and c learned scalars, and
             g = 0 while nothing is written (the frozen model exactly)
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmem_jax.errors import GmemError
from gmem_jax.memory.config import MemoryConfig

_EPS = 1e-6


def masked_mean(h: jax.Array, mask: jax.Array) -> jax.Array:
    """h [B, T, H] averaged over mask [B, T] -> [B, H] float32 (0 where the mask is empty)."""
    w = mask.astype(jnp.float32)
    return (h.astype(jnp.float32) * w[..., None]).sum(1) / jnp.maximum(w.sum(1), 1.0)[:, None]


class _MLPMap(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear: the shape of both the encoder and the decoder."""

    hidden: int
    out: int
    dtype: str = "float32"
    zero_out: bool = False  # output layer 0 at init: the map adds exactly nothing until trained
    # no biases, no LayerNorm: f(0) = 0 exactly and a faint input gives a faint output (memory.inject_read_only)
    zero_at_zero: bool = False

    @nn.compact
    def __call__(self, x):
        bias = not self.zero_at_zero
        x = nn.Dense(self.hidden, dtype=self.dtype, use_bias=bias, name="in")(x)
        x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name="norm")(x) if bias else x, approximate=False)
        out_init = nn.initializers.zeros if self.zero_out else nn.linear.default_kernel_init
        return nn.Dense(self.out, dtype=self.dtype, kernel_init=out_init, use_bias=bias, name="out")(x)


def in_entity_block(entity: jax.Array, cfg: MemoryConfig, write: bool) -> jax.Array:
    """Which slots are each token's entity's (memory.address_oracle, address_weight): entity labels [B, T] (-1:
    none) -> [B, T, S] bool. Slot s is in block s * blocks // S; a token of entity e belongs to block
    1 + e mod (blocks - 1); on the write side a token of no entity (filler) to block 0, on the read side to none."""
    nb = cfg.address_oracle_blocks
    block = jnp.arange(cfg.num_slots) * nb // cfg.num_slots  # [S]
    target = jnp.where(entity >= 0, 1 + jnp.maximum(entity, 0) % (nb - 1), 0 if write else -1)  # [B, T]
    return block == target[..., None]


class GMemory(nn.Module):
    """The trainable memory. `hidden_size` is the backbone's H."""

    cfg: MemoryConfig
    hidden_size: int

    def setup(self):
        c, H, M, dt = self.cfg, self.hidden_size, self.cfg.mem_dim, self.cfg.dtype
        if not c.inject_read_only:  # read-only injection: the memory starts empty (zeros), nothing to learn
            self.slots = self.param("slots", nn.initializers.normal(1.0 / M**0.5), (c.num_slots, M))
        self.encoder = _MLPMap(2 * M, M, dt)
        if c.standardize_inputs:  # identity until with_input_statistics sets them from data
            self.input_stats = {side: (self.param(f"{side}_mean", nn.initializers.zeros, (H,)),
                                       self.param(f"{side}_inv_std", nn.initializers.ones, (H,)))
                                for side in ("read", "write")}
        self.decoder = _MLPMap(H, H, dt, zero_at_zero=c.inject_read_only)
        if c.write_attention == "tokens":
            self.write_attn = nn.MultiHeadDotProductAttention(num_heads=c.num_heads, qkv_features=M, out_features=M,
                                                              dtype=dt)
        elif c.write_attention == "slots":  # the same four projections, used by _slot_competitive_write
            self.write_q, self.write_k, self.write_v, self.write_o = (nn.Dense(M, dtype=dt) for _ in range(4))
        else:  # keyed: addresses separate from contents; read_q maps a reading token to its query
            self.slot_keys = self.param("slot_keys", nn.initializers.normal(1.0), (c.num_slots, M))
            self.read_q, self.write_k, self.write_v, self.write_o = (nn.Dense(M, dtype=dt) for _ in range(4))
            self.write_strength = nn.Dense(1, dtype=dt)
            if c.read_written_only:  # per head: the logit of reading nothing (a slot whose value is 0)
                self.read_null = self.param("read_null", nn.initializers.zeros, (c.num_heads,))
            if c.write_recency:
                self.recency = self.param("write_recency", nn.initializers.constant(c.write_recency), ())
            if c.write_key_window > 1:  # c [w, heads]: key mix over this token and the w - 1 before it
                start = (lambda _, shape: jnp.full(shape, 1.0 / shape[0])) if c.write_key_mix_init == "uniform" \
                    else (lambda _, shape: jnp.zeros(shape).at[0].set(1.0))
                self.key_mix = self.param("write_key_mix", start, (c.write_key_window, c.num_heads))
                if c.write_key_select:  # u [heads, M/heads]: what a token of the window is picked for
                    self.key_query = self.param("write_key_query", nn.initializers.zeros,
                                                (c.num_heads, M // c.num_heads))
        n_gates = 2 if c.gate == "gru" else 1  # gru: update z and reset r
        bias = jnp.concatenate([jnp.full((M,), c.gate_bias), jnp.zeros(((n_gates - 1) * M,))])
        self.gate = nn.Dense(n_gates * M, dtype=dt, kernel_init=nn.initializers.lecun_normal(),
                             bias_init=lambda *_: bias)
        if c.gate == "gru":
            self.candidate = nn.Dense(M, dtype=dt)
        self.importance_mlp = nn.Sequential([nn.Dense(max(M // 4, 1), dtype=dt), nn.gelu, nn.Dense(1, dtype=dt)])
        if c.injection == "final":
            # W_inj [h; r] + b written as h + W[h; r] + b with W, b = 0 at init: the same function class as the
            # author's fusion, but the identity at init holds exactly at any matmul precision (bf16 TPU passes).
            if not c.inject_read_only:
                self.inject_fuse = nn.Dense(H, dtype=dt, kernel_init=nn.initializers.zeros)
            if c.token_gate or c.inject_read_only:  # W[h; r] split in two: the memory's half W_r r on its own
                self.inject_read = nn.Dense(H, dtype=dt, use_bias=False, kernel_init=nn.initializers.zeros)
            if c.token_gate:
                self.inject_token_gate = nn.Dense(1, dtype=dt)
            if c.later_read_map and c.later_read_hidden:  # the later targets' own decoder of what was retrieved
                self.inject_later = _MLPMap(c.later_read_hidden, H, dt, zero_out=True, zero_at_zero=c.inject_read_only)
            elif c.later_read_map:  # the later targets' own linear map of the decoded read (W_l)
                self.inject_later = nn.Dense(H, dtype=dt, use_bias=False, kernel_init=nn.initializers.zeros)
        else:
            self.inject_gate = self.param("inject_gate", nn.initializers.zeros, (H,))
        if c.scope_gate:  # a pooled summary of what was written, matched with the question's (see the module doc)
            self.scope_proj = nn.Dense(M, use_bias=False, dtype=dt)
            self.scope_scale = self.param("scope_scale", nn.initializers.constant(c.scope_gate_scale), ())
            self.scope_bias = self.param("scope_bias", nn.initializers.constant(c.scope_gate_bias), ())
        if c.sp_head:
            self.sp_sentence = nn.Dense(M, dtype=dt)
            self.sp_question = nn.Dense(M, dtype=dt)
            self.sp_score = nn.Sequential([nn.Dense(M, dtype=dt), nn.gelu, nn.Dense(1, dtype=dt)])

    # ---- state -------------------------------------------------------------------------------------------
    def initial_state(self, batch: int) -> jax.Array:
        """The learned slot bank broadcast to [B, S, M]: every document starts from the same memory (all zeros
        with memory.inject_read_only); with memory.scope_gate a zero summary row follows, [B, S + 1, M]."""
        c = self.cfg
        if c.inject_read_only:
            slots = jnp.zeros((batch, c.num_slots, c.mem_dim), jnp.float32)
        else:
            slots = jnp.broadcast_to(self.slots.astype(jnp.float32), (batch,) + self.slots.shape)
        if c.scope_gate:
            return jnp.concatenate([slots, jnp.zeros((batch, 1, c.mem_dim), jnp.float32)], 1)
        return slots

    def split_summary(self, state: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
        """state -> (slots [B, S, M], the written segments' summary u [B, M] with memory.scope_gate, else None)."""
        if not self.cfg.scope_gate:
            return state, None
        return state[:, :-1], state[:, -1]

    def importance(self, state: jax.Array) -> jax.Array:
        """Per-slot importance s in (0, 1): [B, S(+1), M] -> [B, S]."""
        return self._slot_importance(self.split_summary(state)[0])

    def _slot_importance(self, slots: jax.Array) -> jax.Array:
        """`importance` of slots [B, S, M] already split from any summary row."""
        return jax.nn.sigmoid(self.importance_mlp(slots)[..., 0].astype(jnp.float32))

    def scope_vector(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        """`scope_project` of the mean of h [B, T, H] over mask [B, T] -> [B, M]. Mean-pooled, because the frozen
        model's pooled features tell a question its edit from another (docs/analysis/zsre_scope_probe.py) where no
        token-level read learned to."""
        return self.scope_project(masked_mean(h, mask))

    def scope_project(self, x: jax.Array) -> jax.Array:
        """unit(P standardise(x)): a pooled hidden state x [B, H] -> [B, M] (read-side statistics: the final hidden
        states on both sides)."""
        z = self.scope_proj(self._standardize(x, "read").astype(self.cfg.dtype)).astype(jnp.float32)
        return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))

    def scope_gate_value(self, state: jax.Array, query: jax.Array) -> jax.Array:
        """The scope gate g [B] from state [B, S + 1, M] and the question's `scope_vector` [B, M]: sigmoid(a cos + c)
        of the question with the written summary, exactly 0 while nothing has been written."""
        _, u = self.split_summary(state)
        n2 = jnp.sum(u * u, -1)
        cos = jnp.sum(query * u, -1) * jax.lax.rsqrt(jnp.maximum(n2, 1e-12))
        g = jax.nn.sigmoid(self.scope_scale * cos + self.scope_bias)
        return jnp.where(n2 > 0, g, 0.0)

    def encode(self, h: jax.Array, side: str = "read") -> jax.Array:
        """E(h): [B, T, H] -> [B, T, M]; `side` ("read" / "write") picks the input statistics."""
        return self.encoder(self._standardize(h, side).astype(self.cfg.dtype))

    def _standardize(self, h: jax.Array, side: str) -> jax.Array:
        """(h - mu) * inv_sigma per channel with `side`'s input statistics (standardize_inputs; else h as is)."""
        if not self.cfg.standardize_inputs:
            return h
        mean, inv_std = self.input_stats[side]
        return (h.astype(jnp.float32) - mean) * inv_std

    # ---- write (consolidate) -----------------------------------------------------------------------------
    def _split_heads(self, y: jax.Array) -> jax.Array:
        """[..., L, M] -> [..., L, heads, M / heads] in float32."""
        nh = self.cfg.num_heads
        return y.reshape(y.shape[:-1] + (nh, y.shape[-1] // nh)).astype(jnp.float32)

    def _oracle_bias(self, entity: Optional[jax.Array], write: bool) -> jax.Array:
        """memory.address_oracle's logit bias [B, T, S] from entity labels [B, T] (-1: none) on each token's
        `in_entity_block` slots (see MemoryConfig)."""
        if entity is None:
            raise GmemError("memory address_oracle needs the batch's entity labels (tasks.base.collate makes them "
                            "from the task's SegmentedExample.entity); build batches with collate or set "
                            "address_oracle=0")
        return self.cfg.address_oracle * in_entity_block(entity, self.cfg, write).astype(jnp.float32)

    def _slot_competitive_write(self, state: jax.Array, x: jax.Array, mask: jax.Array, content_only: bool = False,
                                x_key: Optional[jax.Array] = None, entity: Optional[jax.Array] = None,
                                address_terms: bool = False):
        """Slots compete for tokens: state [B, S, M], x [B, T, M], mask [B, T] -> (A [B, S, M], strength [B, S],
        the content weights [B, heads, S, T]: how much of what slot s stores (per head) is token t's value, rows
        summing to 1 where the slot won anything, since A_s = W_o(sum_t w_st v_t) + b_o = sum_t w_st (W_o v_t + b_o)).

        Per head, every real token distributes one unit of weight over the slots (softmax over S); slot s stores
        the weighted mean of the values of what it won, and its write strength is min(1, weight won), averaged
        over heads. With S >> T most slots win almost nothing, so they (and the gate) leave them as they were.
        A slot's address is its content ("slots") or its fixed learned key ("keyed"). Keyed differs twice more:
        each token's unit of weight is scaled by a learned strength in (0, 1), so a token can decline to be
        stored relative to the other tokens of its segment (a decline shared by all of them cancels out: a slot's
        write strength is the weight it won relative to the most-written slot of its head; a variant measured
        against the most-offered slot at full strength did not bind better after filler segments in a synthetic
        check, docs/results.md, "bAbI qa1: the keyed write alone").
        With min(1, won) and S >> T, an unsharpened address gives every slot ~T/S: the write is too weak to
        learn from (synthetic binding features at 256 slots: 37% right vs 96% with the relative strength;
        docs/results.md, "Binding"). content_only: the token-to-slot shares are gradient constants (see `write`).
        x_key [B, T, M] (memory.write_key_source="final"): what a token's address and strength come from (else x).
        memory.write_value_shift: token t's address carries token t + 1's value (t's content weights then say how
        much of that value a slot holds), and only tokens followed by a real token offer one.
        entity [B, T] (memory.address_oracle): the labels whose slot blocks the addresses are biased to.
        address_terms (memory.address_weight): also return (sum over real tokens of -log of the address mass on the
        token's entity's block, mean over heads [B], how many real tokens [B]), else None, as a fourth item."""
        B, S, M = state.shape
        x_key = x if x_key is None else x_key
        if self.cfg.write_value_shift:
            x = jnp.pad(x[:, 1:], ((0, 0), (0, 1), (0, 0)))
            mask = mask * jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
        real = mask > 0  # [B, T] the tokens that offer a value (before the keyed write's strength scales them)
        if self.cfg.write_attention == "keyed":
            keys = self._split_heads(self.slot_keys)  # [S, nh, M/nh], the same for every example
            q = jnp.broadcast_to(keys, (B,) + keys.shape)
            mask = mask * jax.nn.sigmoid(self.write_strength(x_key)[..., 0].astype(jnp.float32))
        else:
            q = self._split_heads(self.write_q(state.astype(self.cfg.dtype)))
        k, v = self._split_heads(self.write_k(x_key)), self._split_heads(self.write_v(x))  # [B, T, nh, M/nh]
        if self.cfg.write_attention == "keyed" and self.cfg.write_key_window > 1:  # k'_t = sum_j c_j k_(t-j)
            T, k = k.shape[1], k * (mask > 0)[:, :, None, None]  # what sits under padding never enters a key
            shift = lambda a, j: jnp.pad(a, ((0, 0), (j, 0)) + ((0, 0),) * (a.ndim - 2))[:, :T]  # noqa: E731
            shifted = jnp.stack([shift(k, j) for j in range(self.cfg.write_key_window)])  # [w, B, T, nh, d]
            mix = self.key_mix.astype(jnp.float32)  # [w, nh]
            if self.cfg.write_key_select:  # a content-and-position softmax over the window's real tokens
                real = jnp.stack([shift(mask > 0, j) for j in range(self.cfg.write_key_window)])[..., None]
                pick = mix[:, None, None] + jnp.einsum("jbthd,hd->jbth", shifted, self.key_query.astype(
                    jnp.float32)) / jnp.sqrt(k.shape[-1])
                # finite, not -inf: a padding token's window may hold no real token, and its share is 0 anyway
                k = jnp.einsum("jbthd,jbth->bthd", shifted, jax.nn.softmax(jnp.where(real, pick, -1e9), axis=0))
            else:
                k = jnp.einsum("jbthd,jh->bthd", shifted, mix)
        logits = jnp.einsum("bshd,bthd->bhst", q, k) * (self.cfg.address_scale / jnp.sqrt(q.shape[-1]))
        if self.cfg.address_oracle:
            logits = logits + jnp.swapaxes(self._oracle_bias(entity, write=True), 1, 2)[:, None]
        address = None
        if address_terms:
            if entity is None:
                raise GmemError("memory address_weight's write loss needs the batch's entity labels "
                                "(tasks.base.collate makes them from the task's SegmentedExample.entity)")
            own = jnp.swapaxes(in_entity_block(entity, self.cfg, write=True), 1, 2)[:, None]  # [B, 1, S, T]
            # log of the softmax mass on the block, without materialising the log-softmax over every slot
            block_logp = (jax.nn.logsumexp(jnp.where(own, logits, -jnp.inf), axis=2)
                          - jax.nn.logsumexp(logits, axis=2))  # [B, nh, T]
            address = (-(block_logp.mean(1) * real).sum(-1), real.sum(-1).astype(jnp.float32))
        share = jax.nn.softmax(logits, axis=2) * mask[:, None, None, :]  # [B, nh, S, T]; padding wins nothing
        if content_only:
            share = jax.lax.stop_gradient(share)
        won = share.sum(-1)  # [B, nh, S]
        content_share, content_won = share, won
        if self.cfg.write_recency:  # later tokens outweigh earlier ones in what a slot stores, not in how strongly
            # it is written (that would also fade a slot only an early token won). Measured back from the segment's
            # last real token, which always weighs 1, so padding on either side cannot shrink a write below _EPS.
            t = jnp.arange(x.shape[1], dtype=jnp.float32)
            last = jnp.max(jnp.where(mask > 0, t, 0.0), axis=-1, keepdims=True)  # [B, 1]
            decay = jnp.exp(self.recency * jnp.minimum(t - last, 0.0) / max(x.shape[1] - 1, 1))  # [B, T]
            content_share = share * decay[:, None, None, :]
            content_won = content_share.sum(-1)
        content_weights = content_share / (content_won[..., None] + _EPS)
        a = jnp.einsum("bhst,bthd->bshd", content_weights, v).reshape(B, S, M)
        if self.cfg.write_attention == "keyed":  # relative: the most-written slot of a head gets the full gate
            strength = won / (won.max(-1, keepdims=True) + _EPS)
            if self.cfg.write_top_k:  # only each head's k most-won slots; ties at the k-th value are all kept
                kth = jax.lax.top_k(jax.lax.stop_gradient(won), min(self.cfg.write_top_k, S))[0][..., -1:]
                strength = jnp.where(won >= kth, strength, 0.0)
        else:
            strength = jnp.minimum(won, 1.0)
        a = self.write_o(a.astype(self.cfg.dtype)).astype(jnp.float32)
        if self.cfg.read_by_write_key:  # each head's first half stores the write keys of what the slot won
            stored_key = jnp.einsum("bhst,bthd->bshd", content_weights, k)[..., : k.shape[-1] // 2]
            a = jnp.concatenate([stored_key, self._split_heads(a)[..., k.shape[-1] // 2:]], -1).reshape(B, S, M)
        return a, strength.mean(1), content_weights, address

    def write(self, state: jax.Array, h: jax.Array, mask: jax.Array, gate_override: Optional[float] = None,
              content_only: bool = False, final_h: Optional[jax.Array] = None, provenance: bool = False,
              entity: Optional[jax.Array] = None, address_terms: bool = False,
              read_encoded: Optional[jax.Array] = None):
        """Consolidate a segment into memory.

        state [B, S, M]; h [B, T, H]; mask [B, T] True on real tokens. Returns (new state [B, S, M], gate [B, S, M]),
        and with provenance=True (memory.pointer_weight; keyed write, update gate) a third item P [B, S, T]: the share
        of slot s's new content that is token t's value, z_s (its gate, averaged over channels) times token t's
        content weight averaged over the heads (each head mixes its part of the values, W_o then mixes the heads),
        so a read with weights alpha [S] retrieves about sum_t (alpha P)_t of token t's value from this segment.
        A segment with no real tokens (front padding) leaves the memory exactly unchanged. gate_override forces the
        update gate (0 = closed, 1 = open) for tests and ablations. content_only (memory.later_train_content; not
        for write_attention="tokens"): the same values, but which slot gets what and how much of it (the
        token-to-slot shares, the gates) are gradient constants, so a loss through this state trains only what is
        stored (values, output map, GRU candidate, the encoder through them).
        final_h [B, T, H]: the segment's final hidden states, pooled into the summary row (memory.scope_gate) and
        the source of the write keys (memory.write_key_source="final"). entity [B, T]: memory.address_oracle's labels.
        read_encoded [B, T, M]: E(final_h) as the segment's read computed it (read statistics), passed so the
        encoder's backward runs once: it is then the write keys with write_key_source="final", and the values too
        when `MemoryConfig.shares_encoding` (h is final_h); anything else is encoded here.
        address_terms (memory.address_weight; keyed write): a last item, the write's address loss terms from entity
        (see `_slot_competitive_write`).
        """
        c = self.cfg
        if provenance and (c.write_attention != "keyed" or c.gate != "update"):
            raise GmemError("memory write provenance needs write_attention='keyed' and gate='update'")
        if address_terms and c.write_attention != "keyed":
            raise GmemError("memory address_weight's write loss needs write_attention='keyed'")
        state, summary = self.split_summary(state)
        if summary is not None and final_h is None:
            raise GmemError("memory scope_gate's write needs the segment's final hidden states: pass final_h=")
        shared = read_encoded is not None and c.shares_encoding
        x, x_key = (read_encoded if shared else self.encode(h, "write")), None
        if c.write_key_source == "final":  # addresses made like the queries of later reads: same features, same stats
            if final_h is None:
                raise GmemError("memory write_key_source='final' needs the segment's final hidden states: pass "
                                "final_h=")
            x_key = self.encode(final_h, "read") if read_encoded is None else read_encoded
        if c.write_attention == "tokens":
            attn_mask = mask[:, None, None, :].astype(bool)  # [B, 1, S(query), T(key)]
            a = self.write_attn(state.astype(c.dtype), x, mask=attn_mask).astype(jnp.float32)
            strength = None
        else:
            a, strength, content_weights, address = self._slot_competitive_write(state, x, mask, content_only, x_key,
                                                                                 entity, address_terms)
        gates = jax.nn.sigmoid(self.gate(jnp.concatenate([state, a], -1).astype(c.dtype)).astype(jnp.float32))
        if content_only:
            gates = jax.lax.stop_gradient(gates)
        z = gates[..., : c.mem_dim]
        if gate_override is not None:
            z = jnp.full_like(z, gate_override)
        if strength is not None:
            z = z * strength[..., None]
        z = z * jnp.any(mask, axis=-1)[:, None, None]  # nothing to write: keep memory bit-for-bit
        if c.gate == "gru":
            reset = gates[..., c.mem_dim:]
            cand = jnp.tanh(self.candidate(jnp.concatenate([reset * state, a], -1).astype(c.dtype)).astype(jnp.float32))
        else:
            cand = a
        new = z * cand + (1.0 - z) * state
        if summary is not None:  # a segment with no real tokens adds nothing (front padding)
            add = jnp.where(jnp.any(mask, -1)[:, None], self.scope_vector(final_h, mask), 0.0)
            new = jnp.concatenate([new, (summary + add)[:, None]], 1)
        out = (new, z)
        if provenance:
            prov = z.mean(-1)[..., None] * content_weights.mean(1)  # [B, S, T] over the token offering the address
            if c.write_value_shift:  # ... whose value is the next token's: index by the token whose value it is
                prov = jnp.pad(prov[..., :-1], ((0, 0), (0, 0), (1, 0)))
            out += (prov,)
        return out + (address,) if address_terms else out

    # ---- read (retrieve) and inject ----------------------------------------------------------------------
    def _read_weights(self, state: jax.Array, h: jax.Array, entity: Optional[jax.Array] = None,
                      encoded: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
        """Read weights: state [B, S, M], h [B, T, H] -> ([B, T, heads, S] (keyed, one softmax per head over that
        head's part of the slots) or [B, T, S]; with memory.token_gate_match the match m [B, T] = mean over heads of
        logsumexp(logits) - log S, how strongly the token's query found something in memory, 0 when the logits are
        uniform; otherwise None). entity [B, T]: memory.address_oracle's labels; encoded [B, T, M]: E(h) computed
        by the caller (the segment step, which hands the same encoding to the write), else computed here."""
        c = self.cfg
        x = self.encode(h) if encoded is None else encoded
        bias = jnp.log(self._slot_importance(state) + _EPS) if c.importance_in_read else jnp.zeros(state.shape[:2])
        if c.write_attention == "keyed":  # per head: match the slots' addresses
            q = self._split_heads(self.read_q(x))  # [B, T, nh, d]
            if c.read_by_content:  # match what each slot holds, [B, S, nh, d]
                logits = jnp.einsum("bthd,bshd->bths", q, self._split_heads(state))
            elif c.read_by_write_key:  # match the write keys each slot stored (first half of each head's part)
                half = q.shape[-1] // 2
                q = q[..., :half]
                logits = jnp.einsum("bthd,bshd->bths", q, self._split_heads(state)[..., :half])
            else:  # match the slots' fixed addresses, [S, nh, d]
                logits = jnp.einsum("bthd,shd->bths", q, self._split_heads(self.slot_keys))
            logits = logits * (c.address_scale / jnp.sqrt(q.shape[-1])) + bias[:, None, None, :]
            if c.address_oracle and c.address_oracle_read:
                logits = logits + self._oracle_bias(entity, write=False)[:, :, None]
        else:
            logits = jnp.einsum("btm,bsm->bts", x.astype(jnp.float32), state) / jnp.sqrt(c.mem_dim) + bias[:, None, :]
        if c.read_written_only:  # unwritten slots (still exactly zero) drop out; the null slot [..., S] joins
            written = jnp.any(self._split_heads(state) != 0, axis=-1).transpose(0, 2, 1)  # [B, nh, S]
            logits = jnp.where(written[:, None], logits, -jnp.inf)
            null = jnp.broadcast_to(self.read_null.astype(jnp.float32)[:, None], logits.shape[:-1] + (1,))
            logits = jnp.concatenate([logits, null], axis=-1)
        match = None  # only token_gate_match uses it: no extra reduction over the slots on the default path
        if c.token_gate_match:
            lse = jax.nn.logsumexp(logits, axis=-1) - jnp.log(float(logits.shape[-1]))
            match = lse.mean(-1) if logits.ndim == 4 else lse
        weights = jax.nn.softmax(logits, axis=-1)
        return (weights[..., :-1] if c.read_written_only else weights), match

    def _gather(self, weights: jax.Array, state: jax.Array) -> jax.Array:
        """alpha Mem: weights from `_read_weights`, state [B, S, M] -> [B, T, M] float32."""
        if weights.ndim == 4:  # keyed: each head reads its part of the slots
            values = self._split_heads(state)
            if self.cfg.read_by_write_key:  # the stored write keys address the slot; only its value half is read
                half = values.shape[-1] // 2
                values = jnp.concatenate([jnp.zeros_like(values[..., :half]), values[..., half:]], -1)
            out = jnp.einsum("bths,bshd->bthd", weights, values)
            return out.reshape(out.shape[:2] + (-1,))
        return jnp.einsum("bts,bsm->btm", weights, state)

    def _retrieve(self, state: jax.Array, h: jax.Array, entity: Optional[jax.Array] = None,
                  encoded: Optional[jax.Array] = None):
        """state [B, S, M], h [B, T, H] -> (alpha Mem [B, T, M] float32, read weights, alpha [B, T, S], match [B, T]);
        entity [B, T]: memory.address_oracle's labels; encoded: see `_read_weights`."""
        state, _ = self.split_summary(state)
        weights, match = self._read_weights(state, h, entity, encoded)
        alpha = weights.mean(2) if weights.ndim == 4 else weights
        return self._gather(weights, state), weights, alpha, match

    def read(self, state: jax.Array, h: jax.Array, entity: Optional[jax.Array] = None):
        """Retrieve for every token: state [B, S, M], h [B, T, H] -> (r [B, T, H], alpha [B, T, S]); entity [B, T]:
        memory.address_oracle's labels."""
        retrieved, _, alpha, _ = self._retrieve(state, h, entity)
        return self.decoder(retrieved.astype(self.cfg.dtype)).astype(jnp.float32), alpha

    def read_and_inject(self, state: jax.Array, h: jax.Array, detach: Optional[jax.Array] = None,
                        later: Optional[jax.Array] = None, content_state: Optional[jax.Array] = None,
                        scope_mask: Optional[jax.Array] = None, scope_query: Optional[jax.Array] = None,
                        entity: Optional[jax.Array] = None, encoded: Optional[jax.Array] = None,
                        source: Optional[jax.Array] = None):
        """`read` then `inject` in one call: state [B, S, M], h [B, T, H] -> (h' [B, T, H], alpha [B, T, S], the
        token gate [B, T] as a gradient constant, for metrics; None without memory.token_gate; with
        memory.scope_gate instead the scope gate g broadcast to [B, T], with its gradient, for the scope loss: g
        itself, also where memory.scope_gate_threshold zeroes the update).
        content_state [B, S, M] (memory.later_train_content): the same memory written with content_only; the
        `detach` tokens then read it with constant read weights instead of having their read stop-gradiented.
        memory.scope_gate: the question vector is the mean of h over scope_mask [B, T] (the segment's prompt), or
        given pooled as scope_query [B, H] (generation, where a decode step sees one token). entity [B, T]:
        memory.address_oracle's labels. encoded [B, T, M]: E(source), if the caller computed it (see `_read_weights`).
        source [B, T, H]: what the read sees, if not h (memory.residual_read_norm: h through the frozen final norm);
        the update is added to h either way."""
        source = h if source is None else source
        retrieved, weights, alpha, match = self._retrieve(state, source, entity, encoded)
        scope = None
        if self.cfg.scope_gate:
            if scope_query is not None:
                query = self.scope_project(scope_query)
            elif scope_mask is not None:
                query = self.scope_vector(source, scope_mask)
            else:
                raise GmemError("memory scope_gate needs the question's prompt: pass scope_mask= or scope_query=")
            scope = jnp.broadcast_to(self.scope_gate_value(state, query)[:, None], h.shape[:2])
        # the hard decision scales the update only; the scope loss keeps g's gradient below the threshold
        scaled = scope if not self.cfg.scope_gate_threshold else jnp.where(
            scope >= self.cfg.scope_gate_threshold, scope, 0.0)
        own_source = None
        if content_state is not None:  # content_state has state's values, so the same weights, held constant
            content = self._gather(jax.lax.stop_gradient(weights), self.split_summary(content_state)[0])
            if self.cfg.later_read_map:  # the later targets reach the content through their own decoder only
                own_source = content
            else:
                retrieved = jnp.where(detach[..., None], content, retrieved)  # equal values, other gradients
                detach = None
        r = self.decoder(retrieved.astype(self.cfg.dtype)).astype(jnp.float32)
        h_out, gate = self._inject(h, r, detach, later, retrieved, own_source, match, scaled)
        return h_out, alpha, (scope if scope is not None else gate)

    def inject(self, h: jax.Array, r: jax.Array, detach: Optional[jax.Array] = None,
               later: Optional[jax.Array] = None, retrieved: Optional[jax.Array] = None,
               own_source: Optional[jax.Array] = None, match: Optional[jax.Array] = None) -> jax.Array:
        """`_inject` without the gate."""
        return self._inject(h, r, detach, later, retrieved, own_source, match)[0]

    def _inject(self, h: jax.Array, r: jax.Array, detach: Optional[jax.Array] = None,
                later: Optional[jax.Array] = None, retrieved: Optional[jax.Array] = None,
                own_source: Optional[jax.Array] = None, match: Optional[jax.Array] = None,
                scope: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array]]:
        """Fuse what was read into the hidden states: h, r [B, T, H] -> [B, T, H] (identity at initialisation).
        `detach` [B, T] bool (final injection; memory.read_grad_targets): at these tokens what the read adds is a
        gradient constant, so their loss trains only the injection's map of h (W_h h + b) and the token gate, nothing
        the memory reads. `later` (bool, broadcastable to [B, T]; memory.later_read_map): these tokens also add
        W_l sg(r), so they train W_l on what was read without training the read (with later_read_hidden > 0:
        L(sg(retrieved)), `retrieved` [B, T, M] being alpha Mem before the shared decoder; `own_source` [B, T, M],
        from `read_and_inject` with later_train_content, replaces sg(retrieved) there: equal values, but gradient to
        what the memory stores). `match` [B, T] (memory.token_gate_match): the read's match score from
        `_read_weights`, a third gate input. `scope` [B, T] (memory.scope_gate) scales the whole update. Returns (h',
        the token gate [B, T] stop-gradiented, or None without token_gate)."""
        token_gate = None
        if self.cfg.injection == "final":
            dt = self.cfg.dtype
            const = (lambda x: x) if detach is None else (  # noqa: E731
                lambda x: jnp.where(detach[..., None], jax.lax.stop_gradient(x), x))
            if self.cfg.token_gate:  # each token decides how much of what the memory read it takes; the later
                # targets train that decision too, but through the gate alone, not through what was read
                features = [h, const(r)]
                if self.cfg.token_gate_match:
                    if match is None:
                        raise GmemError("memory token_gate_match needs the read's match score: inject through "
                                        "read_and_inject, or pass match=")
                    features.append(const(match[..., None]))
                gate = jax.nn.sigmoid(self.inject_token_gate(jnp.concatenate(features, -1).astype(dt)))
                token_gate = jax.lax.stop_gradient(gate[..., 0]).astype(jnp.float32)
                from_h = 0.0 if self.cfg.inject_read_only else self.inject_fuse(h.astype(dt))
                from_r = const(self.inject_read(r.astype(dt)))
            elif self.cfg.inject_read_only:  # h' = h + W_r r: no term that moves a token whatever was read
                gate, from_h, from_r = 1.0, 0.0, const(self.inject_read(r.astype(dt)))
            elif detach is not None:  # W[h; r] + b = (W[h; 0] + b) + (the rest)
                gate = 1.0
                from_h = self.inject_fuse(jnp.concatenate([h, jnp.zeros_like(r)], -1).astype(dt))
                from_r = const(self.inject_fuse(jnp.concatenate([h, r], -1).astype(dt)) - from_h)
            else:
                gate, from_h, from_r = 1.0, self.inject_fuse(jnp.concatenate([h, r], -1).astype(dt)), 0.0
            if self.cfg.later_read_map:  # computed everywhere (a [T, H] x [H, H] matmul), kept where later
                source = own_source if own_source is not None else jax.lax.stop_gradient(
                    retrieved if self.cfg.later_read_hidden else r)
                own = self.inject_later(source.astype(dt))
                later = jnp.broadcast_to(False if later is None else later, h.shape[:2])
                from_r = from_r + jnp.where(later[..., None], own, 0.0)
            if self.cfg.token_gate_scope == "all":  # the token gate can shut the whole update (the frozen answer)
                update = gate * (from_h + from_r)
            else:
                update = from_h + gate * from_r
            if scope is not None:
                update = scope[..., None] * update
            out = h.astype(jnp.float32) + update.astype(jnp.float32)
        else:
            update = self.inject_gate * r
            out = h.astype(jnp.float32) + (update if scope is None else scope[..., None] * update)
        return out.astype(h.dtype), token_gate

    # ---- supporting facts --------------------------------------------------------------------------------
    def sentence_scores(self, sent_h: jax.Array, question_h: jax.Array) -> jax.Array:
        """sent_h [B, N, H] (memory-augmented hidden state at each sentence's last token), question_h [B, H]
        -> logits [B, N] that the sentence is a supporting fact for the question."""
        s = self.sp_sentence(sent_h.astype(self.cfg.dtype))
        q = jnp.broadcast_to(self.sp_question(question_h.astype(self.cfg.dtype))[:, None], s.shape)
        return self.sp_score(jnp.concatenate([s, q, s * q], -1))[..., 0].astype(jnp.float32)

    def __call__(self, h: jax.Array, mask: jax.Array):
        """Touches every parameter (used by init): h [B, T, H], mask [B, T]."""
        state = self.initial_state(h.shape[0])
        entity = jnp.zeros(mask.shape, jnp.int32) if self.cfg.address_oracle else None
        h_out, _, _ = self.read_and_inject(state, h, scope_mask=mask, entity=entity)
        state, _ = self.write(state, h, mask, final_h=h, entity=entity)
        out = h_out, self.importance(state)
        if self.cfg.sp_head:
            out = out + (self.sentence_scores(h, h[:, 0]),)
        return out
