"""Generation that reads memory agrees with the training path, and the generate CLI attaches a trained memory."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax import generation
from gmem_jax.memory.model import forward_segments, prompt_query, write_context
from gmem_jax.memory.modules import GMemory
from gmem_jax.training.checkpoint import export_params
from gmem_jax.training.evaluation import decode_hook_state, generation_hooks

from memory_testlib import perturbed_memory, random_batch, small_memory, tiny_backbone


def test_greedy_decoding_with_memory_matches_the_segment_loop(injection):
    """Teacher-force the greedy continuation through forward_segments: every generated token must be the
    argmax the training path computes at that position (so train and inference read memory the same way)."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory(injection)
    assert_generation_matches_segment_loop(cfg, frozen, mcfg, perturbed_memory(cfg, mcfg, scale=1.0))


@pytest.mark.parametrize("address", ["slot_keys", "content", "write_key"])
def test_greedy_decoding_reads_only_written_slots_like_the_segment_loop(address):
    """memory.read_written_only (read-only injection, top-2 write): generation decides which slots are written from
    the same state as the training path, so the two agree token for token."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", inject_read_only=True, write_top_k=2,
                        read_written_only=True, read_by_content=address == "content",
                        read_by_write_key=address == "write_key")
    mem = perturbed_memory(cfg, mcfg, scale=1.0)
    assert_generation_matches_segment_loop(cfg, frozen, mcfg, dict(mem, read_null=jnp.array([0.5, -0.5])))


def test_greedy_decoding_with_an_induction_write_matches_the_segment_loop():
    """memory.write_key_source='final' + write_value_shift=1 (addresses from the final states, the next token's
    embedding-layer value): the context written for generation is the one the training path writes."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", write_key_window=3, write_layer=0,
                        write_key_source="final", write_value_shift=1)
    assert_generation_matches_segment_loop(cfg, frozen, mcfg, perturbed_memory(cfg, mcfg, scale=1.0))


@pytest.mark.parametrize("injection, read_only, read_norm", [("final", False, False), ("final", True, False),
                                                            ("residual", False, False), ("residual", False, True)])
def test_greedy_decoding_with_a_scope_gate_matches_the_segment_loop(injection, read_only, read_norm):
    """memory.scope_gate: generation pools the prompt up front (`prompt_query`), training pools the same positions
    of the teacher-forced segment (before its first loss target), so the gate and the tokens agree; a gate that
    also pooled the answer tokens would not. Residual: the ZsRE induction recipe's write (values from block 0's
    input, keys from what the read sees at read_layer, captured by a second hook below the read's); read_norm:
    memory.residual_read_norm, whose decoder gets the final norm through the hook state."""
    cfg, frozen = tiny_backbone("llama")
    induction = dict(write_layer=0, write_key_source="final", write_value_shift=1, write_key_window=3)
    mcfg = small_memory(injection, write_attention="keyed", standardize_inputs=True, scope_gate=True,
                        inject_read_only=read_only, residual_read_norm=read_norm,
                        **(induction if injection == "residual" else {}))
    mem = dict(perturbed_memory(cfg, mcfg, scale=1.0), scope_scale=jnp.float32(4.0), scope_bias=jnp.float32(0.0))
    assert_generation_matches_segment_loop(cfg, frozen, mcfg, mem)


@pytest.mark.parametrize("n, hidden", [(1, 0), (3, 16)])
def test_later_read_map_applies_to_the_same_tokens_in_generation_and_training(n, hidden):
    """memory.later_read_map makes the forward depend on which answer target a position predicts: generation
    (from the decode step) and the segment loop (from the loss mask) must agree on it, and it must matter."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", token_gate=True, read_grad_targets=n, later_read_map=True,
                        later_read_hidden=hidden)
    mem = perturbed_memory(cfg, mcfg, scale=1.0)
    # a random gate over [h; r] is shut (or open) everywhere; keep it open-ish so what W_l adds gets through
    mem["inject_token_gate"] = {"kernel": 0.05 * mem["inject_token_gate"]["kernel"], "bias": jnp.ones((1,))}
    new = assert_generation_matches_segment_loop(cfg, frozen, mcfg, mem)
    without = assert_generation_matches_segment_loop(
        cfg, frozen, mcfg, {**mem, "inject_later": jax.tree.map(jnp.zeros_like, mem["inject_later"])})
    np.testing.assert_array_equal(without[:, :n], new[:, :n])  # targets 1..n never add W_l sg(r)
    assert (without[:, n:] != new[:, n:]).any()


def assert_generation_matches_segment_loop(cfg, frozen, mcfg, mem):
    """Generate greedily after a memory-holding context; check each token against forward_segments' argmax on
    the teacher-forced continuation; return the generated tokens [B, G]."""
    B, N, T, P, G = 2, 3, 12, 5, 6
    b = random_batch(cfg, B=B, N=N, T=T)
    ctx_tokens, ctx_mask = b["tokens"][:, : N - 1], b["token_mask"][:, : N - 1]
    state = jax.jit(write_context, static_argnums=(4, 5))(mem, frozen, ctx_tokens, ctx_mask, cfg, mcfg)
    prompt = b["tokens"][:, -1, :P]
    hook_state = decode_hook_state(mem, state, frozen, cfg, mcfg, prompt, np.ones((B, P), bool))
    gen = generation.generate(frozen, cfg, prompt, np.ones((B, P), bool), max_new_tokens=G, eos_ids=(),
                              hooks=generation_hooks(cfg, mcfg), hook_state=hook_state)
    new = np.asarray(gen.tokens)
    # The last segment = prompt + generated tokens; loss positions P-1 .. P+G-2 predict the generated tokens.
    last = np.zeros((B, T), np.int32)
    last[:, :P], last[:, P:P + G - 1] = prompt, new[:, : G - 1]
    mask = np.zeros((B, T), bool)
    mask[:, :P + G - 1] = True
    labels, lmask = np.zeros((B, T), np.int32), np.zeros((B, T), np.float32)
    labels[:, P - 1:P + G - 1], lmask[:, P - 1:P + G - 1] = new, 1.0
    batch = dict(tokens=np.concatenate([ctx_tokens, last[:, None]], 1),
                 token_mask=np.concatenate([ctx_mask, mask[:, None]], 1),
                 labels=np.concatenate([np.zeros((B, N - 1, T), np.int32), labels[:, None]], 1),
                 loss_mask=np.concatenate([np.zeros((B, N - 1, T), np.float32), lmask[:, None]], 1))
    out = jax.jit(lambda m, fz, bb: forward_segments(m, fz, bb, cfg, mcfg))(mem, frozen, batch)
    pos = np.asarray(out.positions)[:, -1, :G]
    np.testing.assert_array_equal(np.sort(pos, -1), np.tile(np.arange(P - 1, P + G - 1), (B, 1)))
    teacher_forced = np.take_along_axis(np.asarray(out.predictions)[:, -1], np.argsort(pos, -1), -1)[:, :G]
    np.testing.assert_array_equal(teacher_forced, new)
    # and the memory matters: without the hooks the continuation differs
    plain = np.asarray(generation.generate(frozen, cfg, prompt, np.ones((B, P), bool), max_new_tokens=G,
                                           eos_ids=()).tokens)
    assert (plain != new).any()
    return new


@pytest.mark.parametrize("scope_gate", [False, True])
def test_generate_cli_writes_context_into_a_trained_memory(tmp_path, capsys, shared_data, scope_gate):
    from gmem_jax.backbones.loading import load_backbone
    from gmem_jax.backbones.tokenizer import load_tokenizer
    from gmem_jax.generate import main

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backbones"))
    from hf_oracle import save_gpt2, transformers

    model_dir = tmp_path / "gpt2"
    save_gpt2(model_dir, vocab=50257, eos=50256)
    transformers.GPT2TokenizerFast.from_pretrained(str(shared_data / "tokenizers" / "gpt2")).save_pretrained(model_dir)
    cfg, frozen = load_backbone(model_dir)
    mcfg = small_memory("final", standardize_inputs=scope_gate, scope_gate=scope_gate)
    mem = perturbed_memory(cfg, mcfg, scale=1.0)
    if scope_gate:  # a half-open gate (the CLI must pool the prompt for it)
        mem = dict(mem, scope_scale=jnp.float32(4.0), scope_bias=jnp.float32(-3.0))
    export_params(mem, {"memory": mcfg.to_dict(), "backbone_id": "tiny", "backbone_fingerprint": cfg.fingerprint()},
                  tmp_path / "export")
    args = ["--model", str(model_dir), "--prompt", "Where is John?", "--max-new-tokens", "5", "--json",
            "--memory-checkpoint", str(tmp_path / "export"), "--segment-len", "8"]
    assert main(args + ["--context", "John went to the kitchen. Mary went to the garden."]) == 0
    with_context = json.loads(capsys.readouterr().out)
    # the same through the library: two segments of 8 tokens written, then generation reading them
    tok = load_tokenizer(model_dir)
    ids = tok("John went to the kitchen. Mary went to the garden.", add_special_tokens=False)["input_ids"]
    n = -(-len(ids) // 8)
    tokens, mask = np.zeros((1, n, 8), np.int32), np.zeros((1, n, 8), bool)
    for k in range(n):
        chunk = ids[8 * k:8 * k + 8]
        tokens[0, k, :len(chunk)], mask[0, k, :len(chunk)] = chunk, True
    state = write_context(mem, frozen, jnp.asarray(tokens), jnp.asarray(mask), cfg, mcfg)
    prompt = np.asarray([tok("Where is John?")["input_ids"]], np.int32)
    hook_state = (mem, state)
    if scope_gate:
        hook_state += (prompt_query(frozen, jnp.asarray(prompt), jnp.ones(prompt.shape, bool), cfg, mcfg),)
        g = GMemory(mcfg, cfg.hidden_size).apply({"params": mem}, state, GMemory(mcfg, cfg.hidden_size).apply(
            {"params": mem}, hook_state[2][:, None], jnp.ones((1, 1), bool), method=GMemory.scope_vector),
            method=GMemory.scope_gate_value)
        assert 0.05 < float(g[0]) < 0.95
    ref = generation.generate(frozen, cfg, prompt, np.ones_like(prompt, bool), max_new_tokens=5,
                              hooks=generation_hooks(cfg, mcfg), hook_state=hook_state)
    assert with_context["token_ids"] == np.asarray(ref.tokens[0, : int(ref.lengths[0])]).tolist()
    # --context without a memory is refused with one line
    assert main(["--model", str(model_dir), "--prompt", "x", "--context", "y"]) == 2
    assert "needs --memory-checkpoint" in capsys.readouterr().err
    # a no-memory twin was trained with nothing written: --context is refused, its empty bank is allowed
    export_params(mem, {"memory": mcfg.to_dict(), "backbone_id": "tiny", "backbone_fingerprint": cfg.fingerprint(),
                        "use_memory": False}, tmp_path / "twin")
    twin = args[:args.index("--memory-checkpoint")] + ["--memory-checkpoint", str(tmp_path / "twin")]
    assert main(twin + ["--context", "John went to the kitchen."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-memory twin" in err and err.count("\n") == 1
    assert main(twin) == 0 and json.loads(capsys.readouterr().out)["token_ids"]


@pytest.mark.parametrize("use_memory", [True, False])
def test_eval_pass_on_the_written_context_equals_the_full_segment_pass(use_memory):
    """Evaluation writes the context once and runs only the question segment on top of it; its teacher-forced
    predictions must equal the last segment of one full forward_segments pass."""
    from gmem_jax.training.evaluation import _memory_pass

    cfg, frozen = tiny_backbone()
    mcfg = small_memory(loss_positions=4)
    mem = perturbed_memory(cfg, mcfg)
    batch = random_batch(cfg, B=3, N=4, T=8, seed=3)
    batch["loss_mask"][:, -1, :2] = 1.0 * batch["token_mask"][:, -1, :2]  # the question segment has targets
    full = forward_segments(mem, frozen, batch, cfg, mcfg, use_memory=use_memory)
    preds, pos, _, state = _memory_pass(mem, frozen, batch, cfg, mcfg, use_memory)
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(full.positions[:, -1]))
    np.testing.assert_array_equal(np.asarray(preds), np.asarray(full.predictions[:, -1]))
    assert (np.asarray(preds) != np.asarray(forward_segments(perturbed_memory(cfg, mcfg, seed=7), frozen, batch, cfg,
                                                             mcfg, use_memory=use_memory).predictions[:, -1])).any()
