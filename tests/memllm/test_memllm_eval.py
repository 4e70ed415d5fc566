"""The MemLLM ZsRE evaluation end to end: real GPT-2 tokenizer, real MemoryDecoder and stores, scripted models.

A scripted model (as in test_memllm_decode) is a real tiny GPT-2 whose attention/MLP outputs are zeroed and whose
position embeddings dominate, so greedy decoding emits a chosen token at each position whatever was fed. Every
question of a kind has the same prompt length, so one script answers it for every record:
  "LoRA" script   src question -> "Nope"; write prompt -> the MEM_WRITE of record 1's triple; the other questions
                  -> a MEM_READ of record 1's subject, then " No" only if the read came back empty (an empty
                  splice " })" is one token shorter than " Oslo})", which shifts the script), then " Oslo".
  frozen script   questions -> "Paris"; edit in the prompt -> "Oslo".
So record 2's answers tell whether its store really was fresh (gold insertion: the read misses -> "No Oslo") or
held what the model wrote (model write: record 1's triple -> "Oslo"), and every metric has a hand-derived value.
"""
import jax
import numpy as np
import pytest

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import init_params
from gmem_jax.errors import GmemError
from gmem_jax.memllm.calls import format_read, format_write
from gmem_jax.memllm.evaluate import EvalSettings, answer_text, evaluate_memllm, gold_store_reads, gold_triple
from gmem_jax.memllm.store import ReadQuery, Triple
from gmem_jax.tasks.base import QA_PROMPT
from gmem_jax.tasks.zsre import ZsRETask, normalize_zsre_records

EOS = 50256
CFG = BackboneConfig(arch="gpt2", vocab_size=50257, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                     head_dim=16, intermediate_size=64, max_position_embeddings=256, norm_eps=1e-5,
                     tie_word_embeddings=True, attention_bias=True, mlp_bias=True, eos_token_ids=(EOS,))
SETTINGS = EvalSettings(max_new_tokens=32, max_calls=4, max_result_tokens=8, cache_bucket=256)  # one cache size
SUBJECTS, ALTS = ("Alder Ridge", "Brackwater"), ("Oslo", "Lima")
LONG = 44  # prompt length (tokens) of every rephrase / locality / portability question


@pytest.fixture(scope="module")
def tok(shared_data):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(shared_data / "tokenizers" / "gpt2")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def padded(tok, make, length):
    """make(filler) -> question; the question whose QA prompt has exactly `length` tokens."""
    for n in range(60):
        q = make(" really" * n)
        if len(ids(tok, QA_PROMPT.format(question=q))) == length:
            return q
    raise AssertionError(f"cannot pad {make('')!r} to {length} tokens")


def make_records(tok):
    raw = []
    for s, alt, port in zip(SUBJECTS, ALTS, ("Bergen", "Paris"), strict=True):
        raw.append({
            "subject": s, "src": f"Who founded {s}?", "alt": alt, "answers": ["Someone"], "loc_ans": "Paris",
            "rephrase": padded(tok, lambda f, s=s: f"Can you tell me who{f} was the founder of {s}?", LONG),
            "loc": "nq question: " + padded(tok, lambda f: f"what is the capital city of{f} France?", LONG),
            "portability": {"New Question": padded(tok, lambda f, s=s: f"Where was the founder of {s}{f} born?", LONG),
                            "New Answer": port}})
    return raw


def scripted(base, continuations):
    """continuations: {prompt length: token ids generated after a prompt of that length} -> params."""
    emb = np.asarray(base["embed"]["embedding"])
    pos = np.zeros((CFG.max_position_embeddings, CFG.hidden_size), np.float32)
    owner = {}
    for length, seq in continuations.items():
        for i, t in enumerate(seq):  # token i is emitted from position length - 1 + i
            p = length - 1 + i
            assert owner.setdefault(p, length) == length, f"scripts for prompt lengths {owner[p]} and {length} overlap"
            pos[p] = 50.0 * emb[t]
    return {**base, "pos_embed": {"embedding": pos}}


@pytest.fixture(scope="module")
def setup(tok):
    raw = make_records(tok)
    recs = normalize_zsre_records(raw)
    base = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
    base["layers"]["attn"]["o"] = jax.tree.map(np.zeros_like, base["layers"]["attn"]["o"])
    base["layers"]["mlp"]["proj"] = jax.tree.map(np.zeros_like, base["layers"]["mlp"]["proj"])

    def lengths(rec):
        def qa(question):
            return len(ids(tok, QA_PROMPT.format(question=question.strip())))

        edit = len(ids(tok, " " + rec.statement())) + len(ids(tok, "\n"))
        return {"src": qa(rec.src), "long": {qa(rec.query(k)[0]) for k in ("generalization", "locality",
                                                                           "portability")},
                "write": len(ids(tok, f"The answer to '{rec.src}' is {rec.alt}.")), "edit": edit}

    first, second = lengths(recs[0]), lengths(recs[1])
    assert first == second and first["long"] == {LONG}, (first, second)  # one script fits both records
    triple = gold_triple(recs[0])
    assert triple == Triple("Alder Ridge", "who founded", "Oslo")
    read = ids(tok, " " + format_read([ReadQuery(triple.subject, triple.relation, None)]))
    junk = ids(tok, " WRONG")[0]
    lora = scripted(base, {
        first["src"]: ids(tok, " Nope") + [EOS],
        first["write"]: ids(tok, " " + format_write([triple])) + [EOS],
        LONG: read + [junk] + ids(tok, " No") + ids(tok, " Oslo") + [EOS],  # [junk]: where " Oslo})" is spliced
    })
    frozen = scripted(base, {first["src"]: ids(tok, " Paris") + [EOS], LONG: ids(tok, " Paris") + [EOS],
                             first["src"] + first["edit"]: ids(tok, " Oslo") + [EOS],
                             LONG + first["edit"]: ids(tok, " Oslo") + [EOS]})
    return ZsRETask(raw), frozen, lora


def test_answer_text():
    assert answer_text(" ({MEM_READ(a>>b>>)--> Oslo}) Oslo") == "Oslo"
    assert answer_text(" Paris\nQuestion: next") == "Paris"
    assert answer_text(" ({MEM_WRITE--> a>>b>>c}) ({MEM_READ(a>>b>>)--> c}) the c city.\n") == "the c city."
    assert answer_text(" Lima ({MEM_READ(a>>b") == "Lima"  # an unfinished call is cut off
    assert answer_text("") == ""


def test_evaluation_runs_every_system_with_exact_metrics(tok, setup):
    task, frozen, lora = setup
    report = evaluate_memllm(task, tok, CFG, frozen=frozen, adapted=lora, split="all", settings=SETTINGS)
    preds = report["predictions"]
    # Record 2's store is fresh: with gold insertion its read of record 1's subject misses.
    gold = preds["memllm_gold_write"]
    assert [gold[f"zsre-1-{k}"]["answer"] for k in ("reliability", "generalization", "portability")] == \
        ["Nope", "No Oslo", "No Oslo"]
    assert [gold[f"zsre-0-{k}"]["answer"] for k in ("reliability", "generalization", "portability")] == \
        ["Nope", "Oslo", "Oslo"]
    assert gold["zsre-0-generalization"]["reads"] == [[["Alder Ridge>>who founded>>"], ["Oslo"]]]
    assert gold["zsre-1-generalization"]["reads"] == [[["Alder Ridge>>who founded>>"], []]]
    # ...whereas the model itself wrote record 1's triple into record 2's store, so that read hits.
    model = preds["memllm_model_write"]
    assert model["zsre-1-write"]["writes"] == [["Alder Ridge", "who founded", "Oslo"]]
    assert model["zsre-1-generalization"]["answer"] == "Oslo"
    assert preds["in_prompt"]["zsre-1-reliability"]["answer"] == "Oslo"
    assert {p["answer"] for p in preds["frozen"].values()} == {"Paris"}

    # the *_novel split is ZsRETask's own (tests/tasks/test_zsre.py); here: the systems
    r = {system: {k: v for k, v in res.items() if not k.endswith("_novel")}
         for system, res in report["results"].items()}
    assert r["frozen"] == {"reliability_em": 0.0, "generalization_em": 0.0, "locality_em": 1.0,
                           "portability_em": 0.5, "locality": 1.0}
    assert r["in_prompt"] == {"reliability_em": 0.5, "generalization_em": 0.5, "locality_em": 0.0,
                              "portability_em": 0.0, "locality": 0.0}
    for system in ("memllm_gold_write", "memllm_model_write"):
        assert r[system] == {"reliability_em": 0.0, "generalization_em": 0.5, "locality_em": 0.0,
                             "portability_em": 0.0, "locality": 0.0}
    s = report["stats"]
    assert s["memllm_gold_write"]["read_hit_rate"] == 0.5 and s["memllm_model_write"]["read_hit_rate"] == 1.0
    assert s["memllm_model_write"]["write_exact"] == 0.5  # record 2 got record 1's triple
    for system in ("memllm_gold_write", "memllm_model_write"):
        assert s[system]["store_triples"] == 1.0 and s[system]["reads"] == 6 and s[system]["read_rate"] == 0.75
        assert s[system]["read_ms"] > 0
    assert s["frozen"]["reads"] == 0 and s["frozen"]["read_ms"] is None
    assert report["gold_store_reads"] == {"store_triples": 2, "queries": 2, "hit_at_1": 1.0, "hit_any": 1.0,
                                          "read_ms": report["gold_store_reads"]["read_ms"]}


def test_bad_requests(tok, setup):
    task, frozen, _ = setup
    with pytest.raises(GmemError, match="unknown MemLLM eval systems"):
        evaluate_memllm(task, tok, CFG, frozen=frozen, adapted=None, split="all", systems=["memory"])
    with pytest.raises(GmemError, match="LoRA-adapted params"):
        evaluate_memllm(task, tok, CFG, frozen=frozen, adapted=None, split="all")


def test_gold_store_reads_on_real_zsre(shared_data):
    recs = ZsRETask(shared_data / "zsre" / "zsre_mend_edit_837.json").records("dev")[:40]
    out = gold_store_reads(recs)
    # Oracle: a gold query's own triple matches both slots exactly, so it ranks first unless another record has
    # the same subject and relation (then either object may come first).
    keys = [(gold_triple(r).subject.casefold(), gold_triple(r).relation) for r in recs]
    unique = sum(keys.count(k) == 1 for k in keys)
    assert out["store_triples"] == len({gold_triple(r) for r in recs}) and out["queries"] == 40
    assert out["hit_any"] == 1.0 and out["hit_at_1"] >= unique / 40
