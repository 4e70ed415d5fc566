"""MemoryConfig: every knob of the G-MemLLM latent memory in one frozen (hashable, jit-static) dataclass."""
from __future__ import annotations

import dataclasses
from typing import Optional

from gmem_jax.errors import GmemError

GATES = ("update", "gru")
INJECTIONS = ("final", "residual")
WRITE_ATTENTIONS = ("tokens", "slots", "keyed")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The latent memory.

    num_slots/mem_dim/num_heads: the slot bank [num_slots, mem_dim] and the write attention's heads.
    gate: "update" (the author's form: Mem' = g*A + (1-g)*Mem) or "gru" (update + reset gates + tanh candidate).
    write_attention: how the write addresses slots. "tokens" (the author's form): each slot attends over the segment's
      tokens (softmax over tokens), so every slot receives an average of the segment. "slots": slots compete for
      each token (softmax over slots, as in Slot Attention, Locatello et al. 2020), each slot stores the mean of
      the tokens it won, and its update gate is scaled by min(1, tokens won): a slot that wins nothing keeps its
      content, so what one example writes lands in a few slots instead of being averaged into all of them. "keyed": like
      "slots", but a slot's address is a fixed learned key [mem_dim] (per head), separate from its content, and the
      read matches each token's query to those keys too. A token can thus store one thing (a city) at an address
      made from another (the person it is about) and be found by it: key/value separation, as in a fast-weight
      memory (Schlag et al. 2021). Each token's write weight is scaled by a learned strength in (0, 1), and a
      slot's gate by the weight it won relative to its head's most-written slot (not min(1, won)).
    write_recency: keyed write only. b > 0: token t of a segment of T also weighs exp(beta (t - t_last) / (T - 1))
      in what a slot stores (t_last the segment's last real token; the slot's write strength is unchanged), beta a
      learned scalar initialised at b, so when several tokens of one segment win the same slot the later ones
      dominate what it stores (a person's latest place, not the mean of all their places). 0: off. At lr 2e-4
      beta stays near b (1.0 -> 1.013 / 1.035 in 1,500 bAbI steps, two seeds), so b is in effect a fixed choice
      unless its rate is raised (train.lr_multipliers="write_recency=...").
    write_key_window: keyed write only. w > 1: the address a token offers (its write key, per head) is a learned
      mix of the keys of itself and the w - 1 tokens before it in the segment, k'_t = sum_j c_j k_(t-j), c = (1, 0,
      ...) at init (per head), so a fact's object can be stored at an address made from its subject a few tokens
      earlier instead of from its own features, which name the object more than whom it is about. 0 or 1: off.
      At the SmolLM2 configs' learning rate (2e-4) c barely leaves its start; raise its rate with
      train.lr_multipliers="write_key_mix=25" (docs/results.md, "A write with recency").
    write_key_mix_init: where c starts: "self" (1, 0, ..., 0: a token's own key) or "uniform" (1/w each: the mean
      key of the window). On bAbI qa1 the place token's own features name the place, hardly its person (a probe:
      43% person, 100% place), while the window's mean names the person (96%), and from "self" c stayed near its
      start: the write addressed places, not people (docs/results.md, "Why binding fails").
    write_key_select: with write_key_window = w > 1: the window's keys are mixed by a softmax over its real tokens,
      a_tj = softmax_j(c_j + u . k_(t-j) / sqrt(mem_dim / heads)), per head, u a learned query (0 at init) and c the
      key mix above used as position logits (so "uniform" starts at the window's mean key, "self" at e : 1 for the
      own key), so the address can come from whichever token of the window u picks out (a name), at whatever
      offset it sits, instead of from fixed offsets.
    address_scale: keyed write only. The logits matching a token's key to the slot addresses, in the write and in
      the read, are multiplied by this fixed factor (1: the plain scaled dot product). Trained bAbI qa1 writes were
      nearly flat, a place token spreading its write over ~900 of 1,024 slots, so every slot held a little of every
      fact; a factor > 1 starts the addresses sharp (docs/results.md, "Why binding fails").
    write_key_source: "write" (default): a token's write key comes from the same hidden states as its value (the
      write source, `write_layer`). "final" (not write_attention="tokens"): from the hidden states the read's
      queries come from (the final-norm ones; with a residual injection the residual stream entering read_layer),
      through the read side's input statistics, so a token's address
      is made the way a later question's query is; the value still comes from the write source.
    write_value_shift: 0 (default) or 1 (not write_attention="tokens"): with 1 the address a token offers stores
      the value of the token after it (induction-head style: "... is" -> "Paris"), so a read whose query resembles
      the key of the token before an answer token retrieves that answer token; the last real token of a segment
      offers no address, the first one's value is stored nowhere. Provenance (pointer_weight) is over the token
      whose value is stored. Meant with write_key_source="final" and write_layer=0 (values = token embeddings).
    write_top_k: keyed write only. k > 0: per head, only the k slots that won the most of a segment's write weight
      are written (the others' write strength is 0), so a segment changes at most k x num_heads slots. Without it
      the relative strength (won / the head's most-won) writes nearly every slot at full strength whenever the
      addresses are flat, which a trained ZsRE write was (an edit changed ~613 of 1,024 slots): every read then
      finds the same smeared content, whatever it asks. With k = 16 an edit changed ~10 slots and EasyEdit
      locality rose from 74 to 88% (read-only injection, docs/results.md, "Recipe distill"). 0: off.
    gate_bias: initial bias of the update gate; negative keeps most of the old memory at first (sigmoid(-1)=0.27).
    injection: "final" fuses [h; r] -> h with an identity-initialised linear map after the final norm, before the
      LM head (the author's place); "residual" adds g * D(r) to the residual stream entering block `read_layer`
      (g is a per-channel gate initialised at 0) so the remaining frozen layers process what was retrieved.
    token_gate: final injection only: the fused update W[h; r] + b is split into W_h h + b + g W_r r, and each token
      scales what it read by its own gate g = sigmoid(v.[h; r] + c), so the memory can stay out of a position where
      what it reads does not matter (the EOS after an answer) without shrinking the map it uses where it does.
    token_gate_scope: what the token gate scales. "read": the memory's half g W_r r only; "all": the whole update,
      h' = h + g (W_h h + b + W_r r), so a token can shut the injection entirely and be answered exactly as by the
      frozen model (EasyEdit locality: questions unrelated to what was written should not move).
    token_gate_match: the token gate also sees how well the token's read query matches the memory,
      m = mean over heads of logsumexp(read logits) - log S (0 for uniform logits), g = sigmoid(v.[h; r; m] + c).
      A gate linear in [h; r] cannot tell a read that found the token's subject from one that found an unrelated
      edit (that needs a product of h and the memory); m is that product, so the gate can shut on questions the
      written memory does not concern. Needs token_gate=True.
    inject_read_only: final injection, keyed write only. The injection adds only what was read, h' = h + W_r r
      (no W_h h + b term, which moves every answer whatever the memory holds: EasyEdit locality 68% reading the
      edit's memory, 70% reading the unwritten slot bank, docs/results.md); the memory starts empty (zeros, no
      learned slot bank) and the decoder has neither biases nor a LayerNorm (which would rescale a faint read to
      full size), so D(0) = 0. A read that lands on unwritten slots thus injects exactly nothing, one that lands faintly on
      written ones injects little, and the no-memory ablation is exactly the frozen model. With token_gate the
      gate scales W_r r; later_read_map's W_l (or its MLP, bias-free too) adds to it. Measured on ZsRE (SmolLM2,
      keyed write, 900 steps): locality 74.8% (67.8% without it) but 0.6% of edits answered (8.9%): the read stays
      diffuse at that budget, so what it injects is the same whatever record was written (docs/results.md).
    read_written_only: inject_read_only only. Each head's read is a softmax over the slots that head has written
      (its part of the state is not all zeros) plus a learned null slot whose value is zero (logit per head, 0 at
      init), instead of over all num_slots addresses. With a sparse write (write_top_k) a question then chooses
      between the few slots the edit wrote and nothing: a read that must otherwise find ~10 written slots among
      1,024 learned addresses stayed diffuse on ZsRE (docs/results.md, "Recipe distill"). The null slot is what
      lets a question the memory does not concern read nothing, so the frozen answer stands. Measured on ZsRE
      (read-only injection, top-16 write, 900 steps): the first answer token 15.1% (6.9% without it) but locality
      72.6% (87.8%): 99% of the read weight stays on slots for unrelated questions too, since one null logit per
      head cannot tell them apart and the slot addresses match them as well as the edit's own questions.
    read_by_content: read_written_only only. The read matches its query with what each written slot holds (that
      head's part of the state) instead of the slot's fixed learned key, so the address is whatever the write
      stored, not a key the question must land on through a learned map of its own. Measured on ZsRE (450 steps):
      no better at telling an edit's questions from unrelated ones (98.5% of the read weight on slots for both).
    read_by_write_key: read_written_only only (update gate). A key-value memory: each head's part of a slot is
      split in two, the write storing in the first half the first half of the write keys of the tokens the slot
      won (mixed with the same weights as the values, which fill the second half), and the read matching the
      first half of its query with those stored keys, then reading only the value halves. The question is thus
      compared directly with what addressed the edit's write (for ZsRE, the subject's tokens), not through the
      fixed slot keys that the write chose among, nor through the stored values. Measured on ZsRE (900 steps):
      no better at telling an edit's questions from unrelated ones (98.5 / 98.4% of the read weight on slots for
      reliability / locality questions), locality 76.8%, 0.6% of edits answered (docs/results.md).
    read_layer: the block the residual injection (and its read/write hidden states) sits at; ignored for "final".
    residual_read_norm: residual injection only. The read (its queries, and what uses what the read sees: the
      write keys of write_key_source="final", the scope gate's summary and question, the write with write_layer=-1)
      sees the residual stream entering read_layer through the frozen final norm, as a write_layer's source does,
      instead of the raw stream; the update is still added to the raw stream. The raw stream's scale differs
      wildly between tokens (SmolLM2-135M at block 15: a segment's first token has norm ~24,000, the others a
      median ~166, nearly all of it in channel 507), which also sets the per-channel input statistics; the final
      norm (and its learned channel weights) puts the read in the space the final injection and a write_layer's
      source use. Measured on ZsRE (block 15, 900 steps): no change, training CE 3.48 vs 3.50, since the
      encoder's LayerNorm already undoes a token's scale (docs/results.md, "The grid's residual cell").
    write_layer: -1: the write consumes the same hidden states the read sees (final injection: the final-norm ones).
      k >= 0: the write consumes the residual stream entering block k passed through the frozen final norm (a
      "logit lens" view): middle layers still carry which token stands where, which the last layer has largely
      turned into next-token predictions. The backbone is still untouched, so features stay cacheable. With a
      residual injection k must be <= read_layer (the memory changes nothing below the layer it reads at).
    standardize_inputs: the encoder first maps h -> (h - mu) * inv_sigma per channel, with one (mu, inv_sigma) [H]
      pair for what the read sees and one for what the write sees, trainable and initialised from training data
      (`memory.model.with_input_statistics`). A pretrained LM's last hidden states are dominated by a direction
      shared by every token (SmolLM2-135M: 49% of the squared norm is the mean vector, 38% of the variance in 5 of
      576 channels), which a plain Linear passes on, so every token's encoding looks alike.
    importance_in_read: the per-slot importance score s multiplies each slot's read weight (log s is added to the
      read logits), so the sparsity/entropy regularisers on s shape what is retrieved instead of only themselves.
    bptt_depth: gradients flow through the memory across at most this many segments (0 = all).
    remat: recompute each segment's activations in the backward pass (activation memory flat in #segments).
    loss_positions: if > 0, logits are computed only at this many positions per segment (those with loss), so a
      QA task never materialises [seq, vocab] logits it does not use. 0 = all positions.
    read_grad_targets: n > 0: only the first n answer targets of each segment train anything of the memory; at the
      later targets (the rest of a multi-token answer, the EOS) what the read adds to the hidden state is a gradient
      constant, so they train only the injection's map of h (W_h h + b) and the token gate. n < 0: the same for the
      last -n targets of each segment only (-1: the EOS). The forward pass is unchanged; 0 = every target trains
      everything. Final injection only. On the tiny backbone the EOS target otherwise keeps the keyed write from
      binding facts to their subject; on SmolLM2 so do a name's later tokens, which n = 1 then leaves to the
      backbone (docs/results.md, "Binding with the EOS target kept").
    later_read_map: with read_grad_targets = n > 0: the later targets (after each segment's first n) also add
      W_l sg(r), through a map W_l of their own (zero at init, inside the token gate if there is one), so they can
      use what was read without training how it is read, stored or decoded. The forward pass then depends on
      whether a position is a later target: in training from the loss mask, in generation from the decode step
      (the k-th decoded token predicts target k + 1, so it is later when k >= n; the prompt's last token predicts
      target 1).
    later_read_hidden: with later_read_map: 0 = W_l is linear on the decoded read r; k > 0 = the later targets
      decode what was retrieved (alpha Mem, before the shared decoder, stop-gradiented) with an MLP of their own,
      M -> k -> H with the output layer 0 at init, since the shared decoder is trained for the first target only.
    later_train_content: with read_grad_targets != 0: the later targets, instead of having the read stop-gradiented,
      train what the memory stores and decodes (the write's values and output map, the GRU candidate, the slot
      bank, the encoder through the values, the decoder) but not where facts go or are looked up (slot keys, read
      queries, the write's token-to-slot shares and strength, the gates, importance). The forward pass is unchanged;
      a second copy of the state, written and read with those weights as gradient constants, carries the later
      targets' gradient (about twice the memory's compute). Keyed or slots write attention. With later_read_map
      (later_read_hidden > 0) the later targets reach that content through their own decoder alone: the shared
      decoder and read map stay the first targets' (on the tiny backbone the EOS training the read map with
      the read itself stop-gradiented already lost the binding: docs/results.md).
    sparsity_weight/entropy_weight: the paper's composite loss CE + a*mean|s| - b*H(s/sum s).
    sp_weight: weight of the supporting-fact BCE (HotpotQA); the sentence head exists only when sp_head.
    scope_weight: read_written_only or scope_gate only. Weight of a scope loss: at every loss position of an example
      whose batch carries `scope` (1: the question concerns what was written, 0: it does not, -1: unknown), the
      binary cross-entropy against it of the scope gate g (scope_gate) or else of the read weight that lands on
      slots (head-averaged, 1 - the null's).
      The training data says which questions an edit concerns (ZsRE: all but locality; `train` labels them when
      this is > 0), as SERAC's scope classifier and GRACE's deferral radius use it; without it a read that helps
      every question's answer format stayed on the edit's slots for unrelated questions too (docs/results.md).
    pointer_weight: keyed write, update gate (either injection: with a residual one the read is the one at
      read_layer). Weight of a copy-supervision (pointer) loss: at every
      loss position whose target token occurs among the real tokens of the last pointer_segments written segments,
      -log of the share of what the read retrieves there (head-averaged) that is those tokens' values, the share
      computed from the read weights and the write's provenance (`GMemory.write(provenance=True)`). It tells the
      read where the answer was written, which CE alone did not teach it. Examples whose batch `scope` is 0 (the
      written segment does not concern them) are not counted. 0: off. On ZsRE it made the read a 3-slot lookup
      landing on the written answer token without making the memory say it (docs/results.md, "A pointer loss"); with
      a residual injection at block 15 the same (a 3-slot lookup, 0.0% exact; "The grid's residual cell").
    pointer_segments: how many of the most recently written segments the pointer loss looks back into (1: the one
      written just before; 0: every written segment of the document). An older segment's provenance fades with each
      later write by the channel mean of (1 - z) of that write's gate, since a slot rewritten with gate z keeps a
      share 1 - z of what it held (exact when z is the same on every channel, as with the gate forced open).
      Multi-segment contexts (bAbI) need it: the fact that answers a question can be any number of segments back
      (on bAbI qa1 at 8x the window, 0 lifted the best recipe from 52 / 48% to 61 / 59% on two seeds;
      docs/results.md, "A pointer loss over every written segment").
    pointer_support: the pointer loss counts only written tokens inside supporting-fact sentences (the batch's
      `support_mask`, from the task's labels), so the read is told which occurrence of the target answers the
      question, not just any written token equal to it: the strong supervision of the original Memory Networks
      (Weston et al., 2015, bAbI's supporting facts). Needs pointer_weight > 0.
    address_oracle: keyed write. A diagnostic, not a method: a logit bias of this size (0: off) on slot block
      address_oracle_blocks-way of every token's address, from the batch's `entity` labels (SegmentedExample.entity;
      bAbI qa1-qa3 label each fact's tokens with its person and the question's with the person asked). The write
      files a token of entity e in block 1 + e mod (blocks - 1) and a token with no entity (filler) in block 0; the
      read of a token of entity e looks in e's block, other reads are unbiased. Slot s is in block s * blocks // S.
      Training with it says what accuracy a write that bound each fact to its person, and a read that asked that
      person, would reach: the upper bound of fixing the binding (docs/results.md, "Why binding fails"). It needs
      the labels at evaluation too, so only teacher-forced scoring applies (docs/analysis/babi_oracle_address.py).
    address_oracle_blocks: how many slot blocks address_oracle (and address_weight) split the S slots into (>= 2;
      block 0 is filler's).
    address_weight: keyed write. A supervised address, evaluable without labels: an auxiliary loss of this weight
      (0: off) pulling each real token's write address into its entity's block (the oracle's blocks: -log of the
      address mass there, mean over heads and tokens) and each loss position labelled with an entity toward its
      block in the read (-log of the head-averaged read mass there, mean over such positions). Labels are needed in
      training only; at evaluation the addresses come from the features alone. The labels must be learnable from
      the text, so bAbI needs task kwargs entity_ids="name" (one number per name), not "story" (order of
      appearance). The Memory Networks' supervision of which fact to use, moved to where the facts are filed.
    address_oracle_read: False: only the write is biased, so the read has to learn to find the asked person's block
      from the question (does a bound write suffice?).
    scope_gate: standardize_inputs. The memory also keeps a summary of what was written (the sum of each written
      segment's unit-normalised, projected, standardised mean final hidden state (with a residual injection: of the
      residual stream entering read_layer, what the read sees there): one more row of
      the state, [B, S + 1, M]) and scales the whole injected update of a segment by g = sigmoid(a cos(q, u) + c),
      q the segment's prompt summarised the same way, a and c learned (initial values scope_gate_scale and
      scope_gate_bias); g = 0 while nothing is written, so an empty memory is exactly the frozen model. A scope
      decision from pooled features, SERAC-style: the untrained cosine of such vectors separates ZsRE questions
      about the written edit from unrelated ones (docs/analysis/zsre_scope_probe.py), which no token-level read
      learned to do. Generation passes the prompt's pooled features up front (`prompt_query`).
    scope_gate_threshold: scope_gate only. A segment whose g is below it injects nothing (the frozen model exactly),
      one at or above it injects g x the update as before: SERAC's hard in-scope decision (its classifier's output
      against 0.5) on top of the soft gate. The scope loss and the logged gate see g itself, so a threshold in
      training still trains g below it. 0: off. `python -m gmem_jax.evaluate --config.eval.scope_gate_threshold=`
      sets it for a trained memory (docs/results.md, "A hard scope decision").
    """

    num_slots: int = 1024
    mem_dim: int = 512
    num_heads: int = 8
    gate: str = "update"
    write_attention: str = "tokens"
    gate_bias: float = -1.0
    injection: str = "final"
    token_gate: bool = False
    token_gate_scope: str = "read"
    token_gate_match: bool = False
    inject_read_only: bool = False
    read_written_only: bool = False
    read_by_content: bool = False
    read_by_write_key: bool = False
    residual_read_norm: bool = False
    read_layer: int = 0
    write_layer: int = -1
    standardize_inputs: bool = False
    importance_in_read: bool = True
    bptt_depth: int = 0
    remat: bool = True
    loss_positions: int = 0
    read_grad_targets: int = 0
    later_read_map: bool = False
    later_read_hidden: int = 0
    later_train_content: bool = False
    write_recency: float = 0.0
    write_key_window: int = 0
    write_key_mix_init: str = "self"
    write_key_select: bool = False
    address_scale: float = 1.0
    write_top_k: int = 0
    write_key_source: str = "write"
    write_value_shift: int = 0
    sparsity_weight: float = 0.01
    entropy_weight: float = 0.001
    sp_head: bool = False
    sp_weight: float = 1.0
    scope_weight: float = 0.0
    scope_gate: bool = False
    scope_gate_scale: float = 10.0
    scope_gate_bias: float = -5.0
    scope_gate_threshold: float = 0.0
    pointer_weight: float = 0.0
    pointer_segments: int = 1
    pointer_support: bool = False
    address_oracle: float = 0.0
    address_oracle_blocks: int = 8
    address_oracle_read: bool = True
    address_weight: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        if self.gate not in GATES:
            raise GmemError(f"memory gate {self.gate!r} unknown; choose one of {GATES}")
        if self.write_attention not in WRITE_ATTENTIONS:
            raise GmemError(f"memory write_attention {self.write_attention!r} unknown; choose one of {WRITE_ATTENTIONS}")
        if self.injection not in INJECTIONS:
            raise GmemError(f"memory injection {self.injection!r} unknown; choose one of {INJECTIONS}")
        if self.mem_dim % self.num_heads:
            raise GmemError(f"memory mem_dim={self.mem_dim} is not divisible by num_heads={self.num_heads}")
        if self.write_layer > self.read_layer and self.injection != "final":
            raise GmemError(f"memory write_layer={self.write_layer} is above read_layer={self.read_layer}: a residual "
                            "injection's write must come from at or below the layer it reads at (whose input the "
                            "memory does not change); set write_layer <= read_layer, or -1 (write what the read sees)")
        if self.residual_read_norm and self.injection != "residual":
            raise GmemError("memory residual_read_norm applies to injection='residual' only (the final injection "
                            "already reads the final-norm hidden states); leave it False")
        if self.token_gate and self.injection != "final":
            raise GmemError("memory token_gate applies to injection='final' only (residual has its own gate); leave "
                            "token_gate=False")
        if self.token_gate_scope not in ("read", "all"):
            raise GmemError(f"memory token_gate_scope {self.token_gate_scope!r} unknown; choose 'read' or 'all'")
        if self.token_gate_scope != "read" and not self.token_gate:
            raise GmemError("memory token_gate_scope='all' needs token_gate=True; set both")
        if self.token_gate_match and not self.token_gate:
            raise GmemError("memory token_gate_match needs token_gate=True; set both")
        if self.inject_read_only and (self.injection != "final" or self.write_attention != "keyed"):
            raise GmemError("memory inject_read_only needs injection='final' and write_attention='keyed' (the memory "
                            "starts all zeros, so a write addressed by slot contents could not tell slots apart)")
        if self.read_written_only and not self.inject_read_only:
            raise GmemError("memory read_written_only needs inject_read_only=True (written slots are told apart from "
                            "unwritten ones by the all-zero initial memory)")
        if self.read_by_content and not self.read_written_only:
            raise GmemError("memory read_by_content needs read_written_only=True (an unwritten slot's content is 0, "
                            "which would match every query alike); set both")
        if self.scope_weight and not (self.read_written_only or self.scope_gate):
            raise GmemError("memory scope_weight needs read_written_only=True or scope_gate=True (what the scope loss "
                            "trains: the read weight on slots, or the scope gate); set one, or scope_weight=0")
        if self.scope_gate and not (self.standardize_inputs and not self.token_gate):
            raise GmemError("memory scope_gate needs standardize_inputs=True (its cosine uses the read side's "
                            "statistics) and token_gate=False")
        if not 0 <= self.scope_gate_threshold < 1 or (self.scope_gate_threshold and not self.scope_gate):
            raise GmemError(f"memory scope_gate_threshold={self.scope_gate_threshold} needs scope_gate=True and a "
                            "value in [0, 1) (0 turns it off)")
        if self.read_by_write_key and not (self.read_written_only and not self.read_by_content
                                           and self.gate == "update" and (self.mem_dim // self.num_heads) % 2 == 0):
            raise GmemError("memory read_by_write_key needs read_written_only=True, read_by_content=False, "
                            "gate='update' (a GRU candidate would remix the stored keys) and an even mem_dim/num_heads")
        if self.pointer_weight < 0 or (self.pointer_weight and not (
                self.write_attention == "keyed" and self.gate == "update")):
            raise GmemError(f"memory pointer_weight={self.pointer_weight} needs write_attention='keyed' and "
                            "gate='update' (what a read retrieves is then a known mix of the written tokens), "
                            "and a value >= 0 (0 turns it off)")
        if self.pointer_support and not self.pointer_weight:
            raise GmemError("memory pointer_support restricts the pointer loss; it needs pointer_weight > 0")
        for name in ("address_oracle", "address_weight"):  # both act on the keyed addresses' slot blocks
            value = getattr(self, name)
            if value < 0 or (value and not (
                    self.write_attention == "keyed" and 2 <= self.address_oracle_blocks <= self.num_slots
                    and not (self.read_by_content or self.read_by_write_key))):
                raise GmemError(f"memory {name}={value} needs write_attention='keyed' with the read matching the slot "
                                "addresses (read_by_content / read_by_write_key off), 2 <= address_oracle_blocks "
                                f"(={self.address_oracle_blocks}) <= num_slots, and a value >= 0 (0 turns it off)")
        if self.pointer_segments < 0:
            raise GmemError(f"memory pointer_segments={self.pointer_segments} must be >= 0 (how many written segments "
                            "the pointer loss looks back into; 0: all of them)")
        if self.read_grad_targets and self.injection != "final":
            raise GmemError("memory read_grad_targets applies to injection='final' only (a residual injection passes "
                            "each read on to later tokens through attention); leave read_grad_targets=0")
        if self.later_read_map and not (self.read_grad_targets > 0 and self.injection == "final"):
            raise GmemError("memory later_read_map needs read_grad_targets > 0 and injection='final' (generation "
                            "knows which tokens come after the first n targets, not which are the last ones)")
        if self.later_train_content and not (self.read_grad_targets and self.write_attention != "tokens"):
            raise GmemError("memory later_train_content needs read_grad_targets != 0 (which targets are later) and "
                            "write_attention 'keyed' or 'slots' (the tokens write has no separable slot shares)")
        if self.later_train_content and self.later_read_map and not self.later_read_hidden:
            raise GmemError("memory later_train_content with later_read_map trains the content through the later "
                            "targets' own decoder of alpha Mem: set later_read_hidden > 0")
        if self.later_read_hidden and not self.later_read_map:
            raise GmemError("memory later_read_hidden sizes the later_read_map's decoder; set later_read_map=True "
                            "or leave later_read_hidden=0")
        if self.write_recency < 0 or (self.write_recency and self.write_attention != "keyed"):
            raise GmemError(f"memory write_recency={self.write_recency} needs write_attention='keyed' and a value "
                            ">= 0 (the initial recency rate; 0 turns it off)")
        if self.write_key_window < 0 or (self.write_key_window > 1 and self.write_attention != "keyed"):
            raise GmemError(f"memory write_key_window={self.write_key_window} needs write_attention='keyed' and a "
                            "value >= 0 (tokens whose keys a token's address mixes; 0 or 1 turns it off)")
        if not 0 < self.address_scale < float("inf") or (self.address_scale != 1.0 and self.write_attention != "keyed"):
            raise GmemError(f"memory address_scale={self.address_scale} needs write_attention='keyed' and a finite "
                            "value > 0 (1 leaves the address logits as they are)")
        if self.write_key_select and self.write_key_window < 2:
            raise GmemError("memory write_key_select picks a token of the key window: set write_key_window > 1")
        if self.write_key_mix_init not in ("self", "uniform"):
            raise GmemError(f"memory write_key_mix_init={self.write_key_mix_init!r}: use 'self' (a token's own key) "
                            "or 'uniform' (the mean key of its window)")
        if self.write_key_source not in ("write", "final") or (self.write_key_source == "final"
                                                              and self.write_attention == "tokens"):
            raise GmemError(f"memory write_key_source={self.write_key_source!r}: use 'write', or 'final' with "
                            "write_attention 'keyed' or 'slots'")
        if self.write_value_shift not in (0, 1) or (self.write_value_shift and self.write_attention == "tokens"):
            raise GmemError(f"memory write_value_shift={self.write_value_shift}: use 0, or 1 with write_attention "
                            "'keyed' or 'slots'")
        if self.write_top_k < 0 or (self.write_top_k and self.write_attention != "keyed"):
            raise GmemError(f"memory write_top_k={self.write_top_k} needs write_attention='keyed' and a value >= 0 "
                            "(slots written per head and segment; 0 turns it off)")
        if self.num_slots < 1 or self.later_read_hidden < 0 or min(self.bptt_depth, self.loss_positions) < 0:
            raise GmemError("memory num_slots must be >= 1 and bptt_depth, loss_positions, later_read_hidden >= 0")

    def check_backbone(self, num_layers: int) -> None:
        if self.write_layer >= num_layers:
            raise GmemError(f"memory write_layer={self.write_layer} is outside the backbone's 0..{num_layers - 1}")
        if self.injection == "residual" and not 0 <= self.read_layer < num_layers:
            raise GmemError(f"memory read_layer={self.read_layer} is outside the backbone's 0..{num_layers - 1}")

    @property
    def reads_entity(self) -> bool:
        """Whether training uses the batch's entity labels (address_oracle, address_weight)."""
        return bool(self.address_oracle or self.address_weight)

    @property
    def shares_encoding(self) -> bool:
        """Whether a segment's read and write encode the same array: final injection without a write_layer (both
        consume the final hidden states) and without input standardisation (whose read and write statistics are
        separate parameters). The segment step then encodes once and hands E(h) to both, so the encoder's backward
        runs once per segment instead of once per use."""
        return self.injection == "final" and self.write_layer < 0 and not self.standardize_inputs

    def replace(self, **kw) -> "MemoryConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "MemoryConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GmemError(f"unknown memory config key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**d, **overrides})


def read_layer_of(mcfg: MemoryConfig) -> Optional[int]:
    return mcfg.read_layer if mcfg.injection == "residual" else None
