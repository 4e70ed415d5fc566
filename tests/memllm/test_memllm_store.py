"""The SQLite triple store: writes, MemLLM read resolution, persistence, concurrency, embedders."""
import os
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memllm.embed import HashedNgramEmbedder
from gmem_jax.memllm.store import ReadConfig, ReadQuery, Triple, TripleStore


def cos_dist(a: str, b: str) -> float:
    """Independent distance computation: straight from the embedder's vectors."""
    v = HashedNgramEmbedder().embed([a, b])
    return float(1.0 - v[0] @ v[1])


@pytest.fixture
def store():
    with TripleStore(":memory:") as s:
        yield s


def test_hashed_embedder_properties():
    e = HashedNgramEmbedder()
    v = e.embed(["Barack Obama", "barack  OBAMA ", "born in", "was born in", "place of birth", ""])
    assert v.shape == (6, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:5], axis=1), 1.0, atol=1e-6)
    assert not v[5].any()  # the empty string is similar to nothing
    np.testing.assert_array_equal(v[0], v[1])  # case and spacing do not matter
    assert 1 - v[2] @ v[3] < 0.25  # "born in" ~ "was born in"
    assert 1 - v[2] @ v[4] > 0.8  # no shared characters, no similarity (it is not a synonym model)
    np.testing.assert_array_equal(HashedNgramEmbedder().embed(["Honolulu"]), e.embed(["Honolulu"]))


def test_hashed_embedder_is_identical_across_processes():
    """Python's str hash is salted per process; stored vectors must not depend on it."""
    code = ("from gmem_jax.memllm.embed import HashedNgramEmbedder as E; import sys; "
            "sys.stdout.buffer.write(E().embed(['Barack Obama', 'born in']).tobytes())")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    here = HashedNgramEmbedder().embed(["Barack Obama", "born in"]).tobytes()
    assert outs[0] == outs[1] == here


def test_insert_query_delete_and_orphan_pruning(store):
    assert store.insert([("Barack Obama", "born in", "Honolulu"), ("Paris", "capital of", "France")]) == 2
    assert store.read(ReadQuery("Barack Obama", "born in", None)) == ["Honolulu"]
    assert store.read(ReadQuery(None, "capital of", "France")) == ["Paris"]
    assert store.read(ReadQuery(None, "born in", "Honolulu")) == ["Barack Obama"]
    assert ("barack obama", "Born In", "HONOLULU") in store
    assert store.delete(("barack obama", "born in", "honolulu")) is True
    assert store.delete(("Barack Obama", "born in", "Honolulu")) is False
    assert store.read(ReadQuery("Barack Obama", "born in", None)) == []
    assert store.triples() == [Triple("Paris", "capital of", "France")]
    # The deleted triple's entities/relation were used by nothing else: gone from tables and from search.
    names = {r[0] for r in store._db.execute("SELECT name FROM entities UNION SELECT name FROM relations")}
    assert names == {"Paris", "France", "capital of"}
    assert {n for n, _ in store.nearest("Barack Obama", k=10)} == {"France", "Paris"}


def test_exact_duplicates_are_stored_once(store):
    assert store.insert([("Barack Obama", "born in", "Honolulu"), (" barack  obama", "BORN IN", "honolulu ")]) == 1
    assert store.insert([("BARACK OBAMA", "born in", "Honolulu")]) == 0
    assert len(store) == 1
    assert store.triples() == [Triple("Barack Obama", "born in", "Honolulu")]  # first-seen spelling kept


def test_threshold_excludes_far_entities_and_relations(store):
    store.insert([("Barack Obama", "born in", "Honolulu")])
    # Within the default thresholds: a typo and a paraphrased relation.
    hits = store.query(ReadQuery("Barak Obama", "was born in", None))
    assert [h.answer for h in hits] == ["Honolulu"] and not hits[0].exact
    want = cos_dist("Barak Obama", "Barack Obama") + cos_dist("was born in", "born in")
    assert hits[0].distance == pytest.approx(want, abs=1e-5)
    # Far: another person, another relation.
    assert cos_dist("Michelle Obama", "Barack Obama") > 0.3
    assert store.read(ReadQuery("Michelle Obama", "born in", None)) == []
    assert cos_dist("died in", "born in") > 0.35
    assert store.read(ReadQuery("Barack Obama", "died in", None)) == []
    # The boundary is inclusive and exactly the configured cosine distance.
    d = cos_dist("Barak Obama", "Barack Obama")
    q = ReadQuery("Barak Obama", "born in", None)
    assert store.read(q, ReadConfig(entity_threshold=d + 1e-4)) == ["Honolulu"]
    assert store.read(q, ReadConfig(entity_threshold=d - 1e-4)) == []
    assert store.read(q, ReadConfig(entity_threshold=0.0)) == []  # 0 = exact only
    assert store.read(ReadQuery("", "born in", None)) == []


def test_exact_first_then_by_distance_and_answer_dedup(store):
    store.insert([
        ("Obama", "born in", "Kenya"),  # approximate subject, farther
        ("Barak Obama", "born in", "Hawaii"),  # approximate subject, nearer
        ("Barack Obama", "was born in", "Honolulu"),  # exact subject, approximate relation
        ("Barack Obama", "born in", "Honolulu"),  # exact both; same answer as the line above
        ("Barack Obama", "born in", "Oahu"),  # exact both, inserted later
    ])
    d_typo, d_short = cos_dist("Barak Obama", "Barack Obama"), cos_dist("Obama", "Barack Obama")
    assert d_typo < d_short <= 0.3
    hits = store.query(ReadQuery("Barack Obama", "born in", None))
    assert [h.answer for h in hits] == ["Honolulu", "Oahu", "Hawaii", "Kenya"]
    assert [h.exact for h in hits] == [True, True, False, False]
    assert hits[0].triple == Triple("Barack Obama", "born in", "Honolulu")  # the exact hit won the dedup
    assert [h.distance for h in hits[2:]] == pytest.approx([d_typo, d_short], abs=1e-5)


def test_results_are_capped_in_insertion_order(store):
    store.insert([("Nolan", "director of", f"Film {i}") for i in range(10)])
    q = ReadQuery("Nolan", "director of", None)
    assert store.read(q) == [f"Film {i}" for i in range(5)]
    assert store.read(q, ReadConfig(max_results=3)) == ["Film 0", "Film 1", "Film 2"]
    assert store.read(ReadQuery(None, "director of", "Film 7")) == ["Nolan"]


def test_persistence_reopen_inspect_and_hand_edit(tmp_path):
    path = tmp_path / "memory.sqlite"
    with TripleStore(path) as s:
        s.insert([("Barack Obama", "born in", "Honolulu"), ("Paris", "capital of", "France")])
        s.delete(("Paris", "capital of", "France"))
        s.insert([("Rome", "capital of", "Italy")])
    # Any SQLite client can read it; edit by hand (embedding left NULL) ...
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT subject, relation, object FROM triple_names ORDER BY id").fetchall() == \
        [("Barack Obama", "born in", "Honolulu"), ("Rome", "capital of", "Italy")]
    db.execute("INSERT INTO entities (name, norm) VALUES ('Ottawa', 'ottawa'), ('Canada', 'canada')")
    db.execute("INSERT INTO triples (subject_id, relation_id, object_id) SELECT "
               "(SELECT id FROM entities WHERE norm='ottawa'), (SELECT id FROM relations WHERE norm='capital of'), "
               "(SELECT id FROM entities WHERE norm='canada')")
    db.commit()
    db.close()
    # ... and reopen: everything is back and the hand-added names are searchable (embeddings filled in).
    with TripleStore(path) as s:
        assert s.triples() == [Triple("Barack Obama", "born in", "Honolulu"), Triple("Rome", "capital of", "Italy"),
                               Triple("Ottawa", "capital of", "Canada")]
        assert s.read(ReadQuery("barack obama", "was born in", None)) == ["Honolulu"]
        assert s.read(ReadQuery(None, "capital of", "canadaa")) == ["Ottawa"]
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM entities WHERE embedding IS NULL").fetchone()[0] == 0
    db.close()


def test_reopen_with_another_embedder_reembeds(tmp_path):
    path = tmp_path / "m.sqlite"
    with TripleStore(path) as s:
        s.insert([("Barack Obama", "born in", "Honolulu")])
    small = HashedNgramEmbedder(dim=64)
    with TripleStore(path, small) as s:
        assert s.read(ReadQuery("Barak Obama", "born in", None)) == ["Honolulu"]
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()[0] == small.name
    assert {len(b) for (b,) in db.execute("SELECT embedding FROM entities")} == {64 * 4}
    db.close()


def test_concurrent_readers_while_writing(tmp_path):
    """One writer commits triples one by one; reader threads, each with its own connection, always see a
    consistent snapshot (a prefix of the writes) and finally everything."""
    path = tmp_path / "shared.sqlite"
    TripleStore(path).close()
    n, errors, seen_counts = 120, [], []
    writer_done = threading.Event()

    def writer():
        try:
            with TripleStore(path) as s:
                for i in range(n):
                    s.insert([(f"entity {i}", "linked to", "hub")])
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            writer_done.set()

    def reader(seed):
        rng = np.random.default_rng(seed)
        try:
            with TripleStore(path) as s:
                last = 0
                while True:
                    done = writer_done.is_set()
                    subjects = [t.subject for t in s.triples()]
                    assert subjects == [f"entity {i}" for i in range(len(subjects))]  # a prefix, in order
                    assert len(subjects) >= last
                    last = len(subjects)
                    seen_counts.append(last)
                    k = int(rng.integers(0, n))
                    got = s.read(ReadQuery(f"entity {k}", "linked to", None), ReadConfig(entity_threshold=0.0))
                    assert got in ([], ["hub"])
                    if k < last:
                        assert got == ["hub"]
                    if done:
                        assert last == n
                        assert sorted(s.read(ReadQuery(None, "linked to", "hub"), ReadConfig(max_results=n))) == \
                            sorted(f"entity {i}" for i in range(n))
                        return
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert seen_counts and max(seen_counts) == n


def test_one_store_shared_by_threads(tmp_path):
    with TripleStore(tmp_path / "m.sqlite") as s:
        def work(t):
            for i in range(25):
                s.insert([(f"s{t}", "r", f"o{i}")])
                s.read(ReadQuery(f"s{t}", "r", None))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(s) == 100
        assert s.read(ReadQuery("s3", "r", None), ReadConfig(max_results=30, entity_threshold=0)) == \
            [f"o{i}" for i in range(25)]


def test_sql_like_names_are_plain_data(store):
    evil = "Robert'); DROP TABLE triples;--"
    store.insert([(evil, "is", "x"), ("a", "b' OR '1'='1", "c")])
    assert store.read(ReadQuery(evil, "is", None)) == ["x"]
    assert store.read(ReadQuery("a", "b' OR '1'='1", None)) == ["c"]
    assert store.read(ReadQuery("a", "b", None), ReadConfig(relation_threshold=0.0)) == []
    assert len(store) == 2


def test_bad_input_raises_one_line_errors(store, tmp_path):
    with pytest.raises(GmemError, match="object is empty"):
        store.insert([("a", "b", "  ")])
    with pytest.raises(GmemError, match="triple #1"):
        store.insert([("a", "b", "c"), ("a", "b")])
    with pytest.raises(GmemError, match="must be a string"):
        store.insert([("a", 3, "c")])
    with pytest.raises(GmemError, match="characters"):
        store.insert([("a" * 300, "b", "c")])
    assert len(store) == 0  # a failed batch inserts nothing
    with pytest.raises(GmemError, match="exactly one"):
        store.query(ReadQuery("a", "b", "c"))
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(GmemError, match="not a usable triple store"):
        TripleStore(junk)
    old = tmp_path / "old.sqlite"
    TripleStore(old).close()
    db = sqlite3.connect(old)
    db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(GmemError, match="schema version 0"):
        TripleStore(old)
    with pytest.raises(GmemError, match="does not exist"):
        TripleStore(tmp_path / "no" / "such" / "dir.sqlite")


def test_failed_write_leaves_store_and_search_consistent(store):
    store.insert([("Paris", "capital of", "France")])
    with pytest.raises(GmemError):
        store.insert([("Berlin", "capital of", "Germany"), ("x", "", "y")])
    assert store.triples() == [Triple("Paris", "capital of", "France")]
    assert "Berlin" not in [n for n, _ in store.nearest("Berlin", k=10)]


def test_hnsw_index_matches_numpy():
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    triples = [(" ".join(rng.choice(words, 2)), "rel", f"o{i}") for i in range(60)]
    with TripleStore(":memory:") as exact, TripleStore(":memory:", ann="hnsw") as ann:
        exact.insert(triples)
        ann.insert(triples)
        queries = [ReadQuery(q, "rel", None) for q in ["alpha beta", "gamma", "omega kappa", "thetaa sigma"]]
        assert [ann.read(q) for q in queries] == [exact.read(q) for q in queries]
        # Deleting (the newest triple too, so its ids would be reused without AUTOINCREMENT) and inserting again.
        for t in [triples[0], triples[-1]]:
            exact.delete(t)
            ann.delete(t)
        more = [("zeta alpha", "rel", "new"), ("omega kappa", "rel", "newer")]
        exact.insert(more)
        ann.insert(more)
        assert [ann.read(q) for q in queries] == [exact.read(q) for q in queries]
        assert ann.read(ReadQuery("zeta alpha", "rel", None))[0] == "new"


def test_backbone_embedder_matches_unpadded_mean_hidden(highest_precision):
    import jax

    from gmem_jax.backbones.config import BackboneConfig
    from gmem_jax.backbones.model import forward, init_params
    from gmem_jax.memllm.embed import BackboneEmbedder

    cfg = BackboneConfig(arch="gpt2", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                         head_dim=8, intermediate_size=64, max_position_embeddings=64, norm_eps=1e-5,
                         tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    tokenize = lambda s: [b % cfg.vocab_size for b in s.encode()]
    emb = BackboneEmbedder(params, cfg, tokenize, name="tiny", batch_size=4)
    texts = ["Obama X", "born in", "Obama", ""]  # one length bucket (8): a single compile
    got = emb.embed(texts)
    assert got.shape == (4, 32)
    # Oracle: the plain forward on the unpadded tokens (both 7 tokens long), mean over tokens, normalised.
    h = np.asarray(forward(params, np.array([tokenize(t) for t in texts[:2]]), cfg, compute_logits=False).hidden)
    want = h.mean(1) / np.linalg.norm(h.mean(1), axis=1, keepdims=True)
    np.testing.assert_allclose(got[:2], want, atol=1e-5)
    assert not got[3].any()  # no tokens, no direction
    np.testing.assert_allclose(emb.embed(["born in"])[0], got[1], atol=1e-6)  # independent of batch mates
    with TripleStore(":memory:", emb) as s:  # names of <= 8 tokens keep to the compiled bucket
        s.insert([("Obama", "born in", "Hawaii")])
        assert s.read(ReadQuery("OBAMA", "born in", None)) == ["Hawaii"]
        assert s.embedder.name.startswith("backbone-mean/tiny/")
