"""Decoding that executes memory calls, end to end, with the real GPT-2 tokenizer and a scripted tiny model.

The scripted model is a real `forward` whose attention and MLP outputs are zeroed, so the residual stream is
embed[token] + pos_embed[position]; pos_embed[p] is a large multiple of embed[script[p + 1]], so greedy decoding
emits script[p + 1] at position p whatever was fed. Where the host must splice memory results, the script holds a
junk token instead: the expected text appears only if the decode loop really ran the read and fed the store's
answer back through the KV cache. All generations share one prompt length and budget, so the three decode
programs compile once for the whole file.
"""
import jax
import numpy as np
import pytest

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import init_params
from gmem_jax.generation import generate
from gmem_jax.memllm.decode import MemoryDecoder, call_stop_ids
from gmem_jax.memllm.store import ReadQuery, Triple, TripleStore

EOS = 50256
CFG = BackboneConfig(arch="gpt2", vocab_size=50257, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                     head_dim=16, intermediate_size=64, max_position_embeddings=256, norm_eps=1e-5,
                     tie_word_embeddings=True, attention_bias=True, mlp_bias=True, eos_token_ids=(EOS,))
PROMPT = "Q: Where was Obama born, and what is the capital of France?"
MAX_NEW = 64


@pytest.fixture(scope="module")
def tok(shared_data):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(shared_data / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def base_params():
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
    zero = lambda x: np.zeros_like(x)
    layers = params["layers"]
    layers["attn"]["o"] = jax.tree.map(zero, layers["attn"]["o"])
    layers["mlp"]["proj"] = jax.tree.map(zero, layers["mlp"]["proj"])
    return params


def scripted(base_params, script: list[int]) -> dict:
    emb = np.asarray(base_params["embed"]["embedding"])
    pos = np.zeros((CFG.max_position_embeddings, CFG.hidden_size), np.float32)
    pos[np.arange(len(script) - 1)] = 50.0 * emb[script[1:]]
    return {**base_params, "pos_embed": {"embedding": pos}}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def build_script(tok, pieces, tail=()):
    """pieces: (text, spliced by the host?) -> (model script with junk where splices go, expected output)."""
    junk = ids(tok, " WRONG")[0]
    script, expected = ids(tok, PROMPT), []
    for text, spliced in pieces:
        piece = ids(tok, text)
        script += [junk] * len(piece) if spliced else piece
        expected += piece
    return script + list(tail), expected


def uninterrupted(params, decoder, tok):
    """Plain greedy generation of MAX_NEW tokens, with the decoder's shapes (same cache length, a stop set of
    the same size that never matches) so it reuses the compiled program."""
    prompt = ids(tok, PROMPT)
    out = generate(params, CFG, np.asarray([prompt]), np.ones((1, len(prompt)), bool), max_new_tokens=MAX_NEW,
                   cache_len=decoder.cache_len(len(prompt), MAX_NEW), stop_ids=[-1] * len(decoder.stop_ids))
    return np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()


@pytest.fixture
def decoder(tok, tmp_path):
    with TripleStore(tmp_path / "memory.sqlite") as store:
        yield MemoryDecoder(CFG, tok, store, max_calls=4, max_result_tokens=8)


def test_call_stop_ids_cover_gpt2_delimiter_splits(tok):
    stops = set(call_stop_ids(tok.batch_decode([[i] for i in range(len(tok))])))
    # Oracle: wherever a token makes the decoded text contain one more "-->" or "})", it must be a stop id.
    texts = ["({MEM_READ(Barack Obama>>born in>>)--> Honolulu})", "({MEM_WRITE--> a>>b>>c}).", "x -->y", "a}) b})",
             "({ MEM_READ ( >>capital of>>France ) -->\n Paris })!", "f({x})-->>})})", "Zürich}) 東京-->",
             "({MEM_WRITE--> Robert') DROP>>x-->>y});--"]
    checked = 0
    for text in texts:
        toks = ids(tok, text)
        for k in range(len(toks)):
            before, after = tok.decode(toks[:k]), tok.decode(toks[:k + 1])
            if any(after.count(d) > before.count(d) for d in ("-->", "})")):
                assert toks[k] in stops, (text, tok.decode([toks[k]]))
                checked += 1
    assert checked >= 16
    for word in [" Paris", "Hello", " (", "-", "--", "}", " {"]:
        assert ids(tok, word)[-1] not in stops, word
    assert len(stops) < 200  # a few hundred host round trips at most, not every token


def test_reads_and_writes_execute_during_generation(tok, base_params, decoder):
    store = decoder.store
    store.insert([("Barack Obama", "born in", "Honolulu")])
    script, expected = build_script(tok, [
        (" Memory: ({MEM_READ(Barack Obama>>born in>>)-->", False),
        (" Honolulu})", True),
        (" Now ({MEM_WRITE--> Paris>>capital of>>France}) ({MEM_READ(>>capital of>>France;Nobody>>born in>>)-->",
         False),
        (" Paris})", True),
        (" Done.", False),
    ], tail=[EOS])
    expected.append(EOS)
    params = scripted(base_params, script)
    out = decoder.generate(params, PROMPT, max_new_tokens=MAX_NEW)
    assert out.text == tok.decode(expected)
    assert out.tokens == expected
    assert out.stop_reason == "eos"
    assert out.num_generated == len(expected) - len(ids(tok, " Honolulu})")) - len(ids(tok, " Paris})"))
    assert out.reads == [((ReadQuery("Barack Obama", "born in", None),), ("Honolulu",)),
                         ((ReadQuery(None, "capital of", "France"), ReadQuery("Nobody", "born in", None)), ("Paris",))]
    assert out.writes == [Triple("Paris", "capital of", "France")]
    assert store.triples() == [Triple("Barack Obama", "born in", "Honolulu"), Triple("Paris", "capital of", "France")]
    # Without the splices the same model emits junk where the answers go: the answers came from the store.
    assert ids(tok, " WRONG")[0] in uninterrupted(params, decoder, tok)


def test_false_stops_resume_exactly_and_budget_is_kept(tok, base_params, decoder):
    """Text full of ")" and ">" stops the device loop many times; resuming must give exactly what one
    uninterrupted greedy decode gives, and the budget counts model tokens."""
    filler = " (x) > (y) -> z) ok; f(a) >> g(b)" * 6
    script, expected = build_script(tok, [(filler, False)])
    assert len(expected) > MAX_NEW
    params = scripted(base_params, script)
    out = decoder.generate(params, PROMPT, max_new_tokens=MAX_NEW)
    assert out.tokens == expected[:MAX_NEW] == uninterrupted(params, decoder, tok)
    assert out.stop_reason == "max_new_tokens" and out.reads == [] and out.writes == []


def test_malformed_read_is_closed_with_no_results(tok, base_params, decoder):
    script, expected = build_script(tok, [(" ok ({MEM_READ(a>>b>>c)-->", False), (" })", True), (" then.", False)],
                                    tail=[EOS])
    out = decoder.generate(scripted(base_params, script), PROMPT, max_new_tokens=MAX_NEW)
    assert out.tokens == expected + [EOS]
    assert out.reads == [((), ())] and out.writes == [] and len(decoder.store) == 0


def test_max_calls_ends_a_call_loop(tok, base_params, decoder):
    writes = "".join(f" ({{MEM_WRITE--> s{i}>>r>>o{i}}})" for i in range(6))
    script, expected = build_script(tok, [(writes, False)], tail=[EOS])
    out = decoder.generate(scripted(base_params, script), PROMPT, max_new_tokens=MAX_NEW)
    assert out.stop_reason == "max_calls"
    assert decoder.store.triples() == [Triple(f"s{i}", "r", f"o{i}") for i in range(4)]
    assert out.text == "".join(f" ({{MEM_WRITE--> s{i}>>r>>o{i}}})" for i in range(4))
