"""MemLLM's explicit memory: (subject, relation, object) triples in an SQLite file, read by approximate matching.

The file is an ordinary SQLite database, so a memory can be saved, opened with any SQLite client, edited and
reopened. Schema (see `_SCHEMA`): `entities` and `relations` (surface `name`, unique normalised `norm`, float32
`embedding` BLOB), `triples` (three foreign keys, unique together), `meta` (schema version, embedder name) and a
read-only view `triple_names` for humans. To add rows by hand insert `name` and `norm` (= `normalize_text(name)`:
NFKC, casefolded, single spaces) and leave `embedding` NULL: missing embeddings are computed on the next open.

Reads follow MemLLM (Modarressi et al. 2024): a query is (subject, relation, ?) or (?, relation, object). The
known entity and the relation are each resolved to candidates: the exact (normalised) match, then nearest
neighbours by cosine distance within `ReadConfig.entity_threshold` / `relation_threshold`. Every stored triple
joining a candidate entity and a candidate relation is a hit; hits are ranked exact-first (fewest approximate
slots), then by summed distance, then by insertion order, deduplicated by answer and capped at `max_results`.
A threshold of 0 makes that slot exact-only.

Concurrency: the database runs in WAL mode, so any number of `TripleStore`s (threads or processes) on one file
read while one writes. One `TripleStore` object may also be shared by threads (its calls are serialised by a
lock). Each store keeps the entity/relation vectors in memory for search, updated in place by its own writes and
reloaded when another connection has committed (`PRAGMA data_version`).
"""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.memllm.embed import Embedder, HashedNgramEmbedder, normalize_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MAX_FIELD_CHARS = 256  # longer "entities" are generation garbage, not names

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entities (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- ids are never reused (the ANN index keys on them)
    name TEXT NOT NULL,          -- first-seen surface form, what reads return
    norm TEXT NOT NULL UNIQUE,   -- normalize_text(name): the exact-match key
    embedding BLOB               -- little-endian float32 [dim]; NULL = compute on next open
);
CREATE TABLE IF NOT EXISTS relations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    norm TEXT NOT NULL UNIQUE,
    embedding BLOB
);
CREATE TABLE IF NOT EXISTS triples (
    id INTEGER PRIMARY KEY,
    subject_id INTEGER NOT NULL REFERENCES entities(id) ON DELETE CASCADE,
    relation_id INTEGER NOT NULL REFERENCES relations(id) ON DELETE CASCADE,
    object_id INTEGER NOT NULL REFERENCES entities(id) ON DELETE CASCADE,
    UNIQUE (subject_id, relation_id, object_id)   -- also the index for (subject, relation, ?) reads
);
CREATE INDEX IF NOT EXISTS triples_by_relation_object ON triples (relation_id, object_id);
CREATE INDEX IF NOT EXISTS triples_by_object ON triples (object_id);
CREATE VIEW IF NOT EXISTS triple_names AS
    SELECT t.id AS id, s.name AS subject, r.name AS relation, o.name AS object
    FROM triples t JOIN entities s ON s.id = t.subject_id JOIN relations r ON r.id = t.relation_id
    JOIN entities o ON o.id = t.object_id;
"""


class Triple(NamedTuple):
    subject: str
    relation: str
    object: str


@dataclasses.dataclass(frozen=True)
class ReadQuery:
    """(subject, relation, ?) when `object` is None, (?, relation, object) when `subject` is None."""

    subject: Optional[str]
    relation: str
    object: Optional[str]

    @property
    def known(self) -> str:
        return self.subject if self.subject is not None else self.object

    @property
    def asks_object(self) -> bool:
        return self.object is None


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    """Read resolution settings. Thresholds are cosine distances (1 - cos) in the embedder's space."""

    entity_threshold: float = 0.3
    relation_threshold: float = 0.35
    max_results: int = 5
    max_candidates: int = 8  # nearest neighbours considered per slot

    def __post_init__(self):
        if self.entity_threshold < 0 or self.relation_threshold < 0:
            raise GmemError(f"read thresholds must be >= 0 (cosine distances), got entity={self.entity_threshold}, "
                            f"relation={self.relation_threshold}")
        if self.max_results < 1 or self.max_candidates < 1:
            raise GmemError(f"max_results={self.max_results} and max_candidates={self.max_candidates} must be >= 1")


class ReadHit(NamedTuple):
    triple: Triple
    answer: str  # the unknown slot's entity
    distance: float  # entity distance + relation distance
    exact: bool  # both slots matched exactly


def _check_field(value, what: str) -> str:
    if not isinstance(value, str):
        raise GmemError(f"{what} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value or not normalize_text(value):
        raise GmemError(f"{what} is empty; every triple slot needs a non-empty name")
    if len(value) > MAX_FIELD_CHARS:
        raise GmemError(f"{what} has {len(value)} characters (max {MAX_FIELD_CHARS}); shorten the name")
    return value


def _as_triple(t, i: int) -> Triple:
    if not isinstance(t, (tuple, list)) or len(t) != 3:
        raise GmemError(f"triple #{i} is {t!r}; give (subject, relation, object)")
    return Triple(*(_check_field(v, f"triple #{i} {slot}") for v, slot in zip(t, Triple._fields)))


def _blob(vec: np.ndarray) -> bytes:
    return np.asarray(vec, "<f4").tobytes()


class _VectorTable:
    """The in-memory mirror of one name table: ids, norms and unit vectors [n, dim] for nearest-neighbour search.

    Rows live in a buffer that grows by doubling so appending after each write is amortised O(1). Exact search is
    one matrix-vector product; with `hnsw` an hnswlib index (inner product on unit vectors) answers instead.
    """

    def __init__(self, dim: int, use_hnsw: bool):
        self.dim = dim
        self.ids = np.zeros(0, np.int64)
        self.vecs = np.zeros((0, dim), np.float32)
        self.size = 0
        self.row_of_norm: dict[str, int] = {}
        self.norms: list[str] = []
        self._hnsw = None
        if use_hnsw:
            import hnswlib

            self._hnsw = hnswlib.Index(space="ip", dim=dim)
            self._hnsw.init_index(max_elements=1024, ef_construction=200, M=16)

    def add(self, ids: Sequence[int], norms: Sequence[str], vecs: np.ndarray) -> None:
        n = len(ids)
        if n == 0:
            return
        if self.size + n > len(self.ids):
            cap = max(16, 2 * (self.size + n))
            self.ids = np.resize(self.ids, cap)
            grown = np.zeros((cap, self.dim), np.float32)
            grown[:self.size] = self.vecs[:self.size]
            self.vecs = grown
        self.ids[self.size:self.size + n] = ids
        self.vecs[self.size:self.size + n] = vecs
        for k, norm in enumerate(norms):
            self.row_of_norm[norm] = self.size + k
        self.norms.extend(norms)
        self.size += n
        if self._hnsw is not None:
            need = self._hnsw.get_current_count() + n
            if need > self._hnsw.get_max_elements():
                self._hnsw.resize_index(2 * need)
            self._hnsw.add_items(np.asarray(vecs, np.float32), np.asarray(ids, np.int64))

    def remove(self, ids: Iterable[int]) -> None:
        drop = set(int(i) for i in ids)
        if not drop:
            return
        keep = [r for r in range(self.size) if int(self.ids[r]) not in drop]
        norms = [self.norms[r] for r in keep]
        ids_kept, vecs_kept = self.ids[keep], self.vecs[keep]
        self.size, self.norms, self.row_of_norm = 0, [], {}
        self.ids, self.vecs = np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        hnsw, self._hnsw = self._hnsw, None
        self.add(ids_kept.tolist(), norms, vecs_kept)
        self._hnsw = hnsw
        if hnsw is not None:
            for i in drop:
                try:
                    hnsw.mark_deleted(i)
                except RuntimeError:  # never added (e.g. inserted by another connection): nothing to hide
                    pass

    def exact_id(self, norm: str) -> Optional[int]:
        row = self.row_of_norm.get(norm)
        return None if row is None else int(self.ids[row])

    def search(self, query: np.ndarray, k: int, max_distance: float) -> list[tuple[int, float]]:
        """query [dim] unit vector -> up to k (id, cosine distance) with distance <= max_distance, nearest first,
        ties broken by id (so results do not depend on row order)."""
        if self.size == 0 or k <= 0:
            return []
        query = query.astype(np.float32)
        if self._hnsw is not None:
            kk = min(k, self.size)
            self._hnsw.set_ef(max(64, kk))
            try:
                labels, dists = self._hnsw.knn_query(query[None], k=kk)
                pairs = [(int(i), float(d)) for i, d in zip(labels[0], dists[0]) if d <= max_distance]
                return sorted(pairs, key=lambda p: (p[1], p[0]))
            except RuntimeError:  # hnswlib found fewer than kk live points (many deletions): search exactly
                pass
        dist = 1.0 - self.vecs[:self.size] @ query  # [n]
        rows = np.flatnonzero(dist <= max_distance)
        rows = rows[np.lexsort((self.ids[rows], dist[rows]))[:k]]  # by distance, then id
        return [(int(self.ids[r]), float(dist[r])) for r in rows]


class TripleStore:
    """A triple memory backed by an SQLite file (or ":memory:").

    `ann`: "numpy" (exact search, the default), "hnsw" (hnswlib, must be installed) or "auto" (hnswlib when
    importable). Use as a context manager or call `close()`.
    """

    def __init__(self, path: Union[str, Path], embedder: Optional[Embedder] = None, *,
                 read_config: ReadConfig = ReadConfig(), ann: str = "numpy", timeout_s: float = 30.0):
        self.path = str(path)
        self.embedder = embedder if embedder is not None else HashedNgramEmbedder()
        self.read_config = read_config
        if ann not in ("numpy", "hnsw", "auto"):
            raise GmemError(f"ann={ann!r} is not one of 'numpy', 'hnsw', 'auto'")
        self._use_hnsw = ann != "numpy" and self._hnswlib_available(required=ann == "hnsw")
        self._lock = threading.RLock()
        if self.path != ":memory:" and not Path(self.path).parent.is_dir():
            raise GmemError(f"cannot create triple store {self.path}: folder {Path(self.path).parent} does not exist")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so each read sees one snapshot and each
            # write is one transaction. check_same_thread=False: calls are serialised by self._lock instead.
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise GmemError(f"cannot open triple store {self.path} ({e}); check the path and its permissions") from None
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._init_schema()
            self._load()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise GmemError(f"{self.path} is not a usable triple store ({e}); give a new path or a store file"
                            ) from None
        except BaseException:
            self._db.close()
            raise

    @staticmethod
    def _hnswlib_available(required: bool) -> bool:
        try:
            import hnswlib  # noqa: F401
        except ImportError:
            if required:
                raise GmemError("ann='hnsw' needs hnswlib; `pip install hnswlib` or use ann='numpy'") from None
            return False
        return True

    # ---- schema and in-memory mirror -------------------------------------------------------------------------

    def _init_schema(self) -> None:
        with self._write():
            for statement in _SCHEMA.split(";\n"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise GmemError(f"{self.path} has triple-store schema version {row[0]}, this code reads "
                                f"{SCHEMA_VERSION}; export it with the matching gmem_jax version")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
            if row is not None and row[0] != self.embedder.name:
                log.warning("%s was embedded with %s; re-embedding its names with %s", self.path, row[0],
                            self.embedder.name)
                self._db.execute("UPDATE entities SET embedding = NULL")
                self._db.execute("UPDATE relations SET embedding = NULL")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (self.embedder.name,))

    def _write(self):
        """A write transaction that takes the database write lock up front (BEGIN IMMEDIATE); nested uses join
        the outer one. A rollback also reloads the in-memory mirror, which may hold rows that never landed."""
        store = self

        class _Txn:
            def __enter__(self):
                store._lock.acquire()
                self.outer = not store._db.in_transaction
                if self.outer:
                    store._db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                try:
                    if self.outer:
                        store._db.execute("ROLLBACK" if exc_type else "COMMIT")
                        if exc_type and hasattr(store, "_tables"):
                            store._load()
                finally:
                    store._lock.release()

        return _Txn()

    def _embed(self, names: Sequence[str]) -> np.ndarray:
        vecs = np.asarray(self.embedder.embed(list(names)), np.float32)
        if vecs.shape != (len(names), self.embedder.dim):
            raise GmemError(f"embedder {self.embedder.name} returned shape {vecs.shape} for {len(names)} texts; "
                            f"expected ({len(names)}, {self.embedder.dim})")
        return vecs

    def _load(self) -> None:
        """(Re)build both vector tables from the database, embedding rows whose embedding is NULL or malformed."""
        with self._lock:
            # The version is read BEFORE the rows: a commit landing in between then triggers one more reload,
            # instead of leaving rows missing from a mirror that claims to be current.
            self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
            self._tables = {}
            for table in ("entities", "relations"):
                rows = self._db.execute(f"SELECT id, name, norm, embedding FROM {table} ORDER BY id").fetchall()
                nbytes = 4 * self.embedder.dim
                missing = [r for r in rows if r[3] is None or len(r[3]) != nbytes]
                fresh = {}
                if missing:
                    vecs = self._embed([r[1] for r in missing])
                    fresh = {r[0]: v for r, v in zip(missing, vecs)}
                    with self._write():
                        self._db.executemany(f"UPDATE {table} SET embedding = ? WHERE id = ?",
                                             [(_blob(v), i) for i, v in fresh.items()])
                vt = _VectorTable(self.embedder.dim, self._use_hnsw)
                vecs = np.stack([fresh[r[0]] if r[0] in fresh else np.frombuffer(r[3], "<f4") for r in rows]) \
                    if rows else np.zeros((0, self.embedder.dim), np.float32)
                vt.add([r[0] for r in rows], [r[2] for r in rows], vecs)
                self._tables[table] = vt

    def _refresh(self) -> None:
        """Reload the mirror if another connection committed since we last looked."""
        if self._db.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
            self._load()

    # ---- writes ----------------------------------------------------------------------------------------------

    def _ensure_names(self, table: str, names: Sequence[str]) -> dict[str, int]:
        """Insert missing names (inside the current write transaction) -> {norm: id}."""
        by_norm = {}
        for name in names:
            by_norm.setdefault(normalize_text(name), name)
        vt = self._tables[table]
        new = [(n, name) for n, name in by_norm.items() if vt.exact_id(n) is None]
        ids = {n: vt.exact_id(n) for n in by_norm if vt.exact_id(n) is not None}
        if new:
            vecs = self._embed([name for _, name in new])
            added = []
            for (norm, name), vec in zip(new, vecs):
                cur = self._db.execute(f"INSERT INTO {table} (name, norm, embedding) VALUES (?, ?, ?) "
                                       "ON CONFLICT (norm) DO NOTHING", (name, norm, _blob(vec)))
                if cur.rowcount:
                    ids[norm] = cur.lastrowid
                    added.append((cur.lastrowid, norm, vec))
                else:  # inserted by another connection after our mirror was loaded
                    ids[norm] = self._db.execute(f"SELECT id FROM {table} WHERE norm = ?", (norm,)).fetchone()[0]
            vt.add([a[0] for a in added], [a[1] for a in added], np.stack([a[2] for a in added]) if added
                   else np.zeros((0, self.embedder.dim), np.float32))
        return ids

    def insert(self, triples: Iterable[Union[Triple, Sequence[str]]]) -> int:
        """Add triples (exact duplicates, after normalisation, are skipped). Returns how many were new."""
        triples = [_as_triple(t, i) for i, t in enumerate(triples)]
        if not triples:
            return 0
        with self._write():
            self._refresh()
            ent = self._ensure_names("entities", [x for t in triples for x in (t.subject, t.object)])
            rel = self._ensure_names("relations", [t.relation for t in triples])
            added = 0
            for t in triples:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO triples (subject_id, relation_id, object_id) VALUES (?, ?, ?)",
                    (ent[normalize_text(t.subject)], rel[normalize_text(t.relation)], ent[normalize_text(t.object)]))
                added += cur.rowcount
        return added

    def delete(self, triple: Union[Triple, Sequence[str]]) -> bool:
        """Remove one triple (matched exactly after normalisation) and any entity/relation it alone used.
        Returns whether it existed."""
        t = _as_triple(triple, 0)
        with self._write():
            self._refresh()
            ents, rels = self._tables["entities"], self._tables["relations"]
            s, r, o = ents.exact_id(normalize_text(t.subject)), rels.exact_id(normalize_text(t.relation)), \
                ents.exact_id(normalize_text(t.object))
            if None in (s, r, o):
                return False
            cur = self._db.execute("DELETE FROM triples WHERE subject_id = ? AND relation_id = ? AND object_id = ?",
                                   (s, r, o))
            if not cur.rowcount:
                return False
            orphans = [i for i in {s, o} if not self._db.execute(
                "SELECT 1 FROM triples WHERE subject_id = ? OR object_id = ? LIMIT 1", (i, i)).fetchone()]
            self._db.executemany("DELETE FROM entities WHERE id = ?", [(i,) for i in orphans])
            ents.remove(orphans)
            if not self._db.execute("SELECT 1 FROM triples WHERE relation_id = ? LIMIT 1", (r,)).fetchone():
                self._db.execute("DELETE FROM relations WHERE id = ?", (r,))
                rels.remove([r])
        return True

    # ---- reads -----------------------------------------------------------------------------------------------

    def _candidates(self, table: str, text: str, threshold: float, k: int) -> list[tuple[int, float, bool]]:
        """A slot's candidates: (id, distance, exact), the exact match first, then neighbours within threshold."""
        norm = normalize_text(text)
        if not norm:
            return []
        vt = self._tables[table]
        exact = vt.exact_id(norm)
        out = [(exact, 0.0, True)] if exact is not None else []
        if threshold > 0:
            out += [(i, d, False) for i, d in vt.search(self._embed([text])[0], k, threshold) if i != exact]
        return out[:max(k, 1)]

    def query(self, query: ReadQuery, config: Optional[ReadConfig] = None) -> list[ReadHit]:
        """Resolve a (s, r, ?) or (?, r, o) query into ranked, deduplicated, capped hits (see the module doc)."""
        cfg = config or self.read_config
        if (query.subject is None) == (query.object is None):
            raise GmemError(f"read query {query} must leave exactly one of subject/object unknown (None)")
        with self._lock:
            self._refresh()
            ents = self._candidates("entities", query.known, cfg.entity_threshold, cfg.max_candidates)
            rels = self._candidates("relations", query.relation, cfg.relation_threshold, cfg.max_candidates)
            if not ents or not rels:
                return []
            known_col = "subject_id" if query.asks_object else "object_id"
            sql = (f"SELECT t.id, t.{known_col}, t.relation_id, s.name, r.name, o.name, "
                   f"t.{'object_id' if query.asks_object else 'subject_id'} FROM triples t "
                   "JOIN entities s ON s.id = t.subject_id JOIN relations r ON r.id = t.relation_id "
                   "JOIN entities o ON o.id = t.object_id "
                   f"WHERE t.{known_col} IN ({','.join('?' * len(ents))}) "
                   f"AND t.relation_id IN ({','.join('?' * len(rels))})")
            rows = self._db.execute(sql, [e[0] for e in ents] + [r[0] for r in rels]).fetchall()
        ent_info = {i: (d, x) for i, d, x in ents}
        rel_info = {i: (d, x) for i, d, x in rels}
        ranked = []
        for tid, eid, rid, s, r, o, answer_id in rows:
            (de, xe), (dr, xr) = ent_info[eid], rel_info[rid]
            ranked.append(((2 - xe - xr, de + dr, tid), answer_id, ReadHit(Triple(s, r, o), o if query.asks_object
                                                                            else s, de + dr, xe and xr)))
        ranked.sort(key=lambda x: x[0])
        hits, seen = [], set()
        for _, answer_id, hit in ranked:
            if answer_id not in seen:
                seen.add(answer_id)
                hits.append(hit)
        return hits[:cfg.max_results]

    def read(self, query: ReadQuery, config: Optional[ReadConfig] = None) -> list[str]:
        """The answers a MEM_READ returns for one query: the unknown slot of each hit, in rank order."""
        return [h.answer for h in self.query(query, config)]

    def nearest(self, text: str, *, kind: str = "entities", k: int = 5) -> list[tuple[str, float]]:
        """The k nearest stored names of `kind` ("entities"/"relations") with cosine distances (for inspection)."""
        if kind not in ("entities", "relations"):
            raise GmemError(f"kind={kind!r} must be 'entities' or 'relations'")
        with self._lock:
            self._refresh()
            pairs = self._tables[kind].search(self._embed([text])[0], k, float("inf"))
            if not pairs:
                return []
            names = dict(self._db.execute(f"SELECT id, name FROM {kind} WHERE id IN "
                                          f"({','.join('?' * len(pairs))})", [i for i, _ in pairs]).fetchall())
        return [(names[i], d) for i, d in pairs]

    def triples(self) -> list[Triple]:
        """All triples, in insertion order."""
        with self._lock:
            return [Triple(*row) for row in self._db.execute(
                "SELECT subject, relation, object FROM triple_names ORDER BY id").fetchall()]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM triples").fetchone()[0]

    def __contains__(self, triple) -> bool:
        t = _as_triple(triple, 0)
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM triples t JOIN entities s ON s.id = t.subject_id JOIN relations r "
                "ON r.id = t.relation_id JOIN entities o ON o.id = t.object_id "
                "WHERE s.norm = ? AND r.norm = ? AND o.norm = ?",
                tuple(normalize_text(x) for x in t)).fetchone() is not None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "TripleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
