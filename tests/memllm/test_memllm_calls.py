"""The MEM_WRITE / MEM_READ call language: parsing well-formed, malformed and hostile text; formatting."""
import logging
import time

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memllm.calls import (MAX_CALL_CHARS, MAX_ITEMS, PendingRead, ReadCall, WriteCall, clean_field,
                                   format_read, format_results, format_write, parse_calls, pending_read)
from gmem_jax.memllm.store import ReadQuery, Triple, TripleStore

OBAMA = ReadQuery("Barack Obama", "born in", None)
FRANCE = ReadQuery(None, "capital of", "France")


def test_parse_well_formed_calls_with_spans():
    w = "({MEM_WRITE--> Barack Obama>>born in>>Honolulu;Paris>>capital of>>France})"
    r = "({MEM_READ(Barack Obama>>born in>>;>>capital of>>France)--> Honolulu;Paris})"
    text = f"Obama was born in Hawaii. {w} Later: {r} done."
    calls = parse_calls(text)
    assert calls == [
        WriteCall((Triple("Barack Obama", "born in", "Honolulu"), Triple("Paris", "capital of", "France")),
                  text.index(w), text.index(w) + len(w)),
        ReadCall((OBAMA, FRANCE), ("Honolulu", "Paris"), text.index(r), text.index(r) + len(r)),
    ]
    assert text[calls[1].start:calls[1].end] == r


def test_parse_tolerates_whitespace():
    text = ("({  MEM_WRITE  -->  Barack Obama >> born in >>Honolulu ;\n Paris>>capital of>> France ; })"
            "({ MEM_READ (  Barack Obama >>born in>> ; >> capital of >>France )  -->   })")
    w, r = parse_calls(text)
    assert w.triples == (Triple("Barack Obama", "born in", "Honolulu"), Triple("Paris", "capital of", "France"))
    assert r.queries == (OBAMA, FRANCE) and r.results == ()


def test_format_produces_the_exact_syntax_and_round_trips():
    triples = [("Barack Obama", "born in", "Honolulu"), ("Paris", "capital of", "France")]
    assert format_write(triples) == "({MEM_WRITE--> Barack Obama>>born in>>Honolulu;Paris>>capital of>>France})"
    assert format_read([OBAMA, FRANCE]) == "({MEM_READ(Barack Obama>>born in>>;>>capital of>>France)-->"
    full = format_read([OBAMA, FRANCE], ["Honolulu", "Paris"])
    assert full == "({MEM_READ(Barack Obama>>born in>>;>>capital of>>France)--> Honolulu;Paris})"
    assert full == format_read([OBAMA, FRANCE]) + format_results(["Honolulu", "Paris"])
    assert format_results([]) == " })"
    assert parse_calls(format_write(triples))[0].triples == tuple(Triple(*t) for t in triples)
    (read,) = parse_calls(full)
    assert read.queries == (OBAMA, FRANCE) and read.results == ("Honolulu", "Paris")
    assert parse_calls(format_read([OBAMA], []))[0].results == ()


def test_round_trip_fuzz_over_awkward_names():
    """Random names over an alphabet of delimiter pieces, brackets, unicode and spaces: every name is either
    rejected by the formatter or parses back to its cleaned self."""
    safe = list("ab ()<-_:'\"é東😀\u200f") + ["MEM_READ", "MEM_WRITE", "--", ")--"]
    unsafe = list("{}>;\x00\n") + [">>", "-->", "({", "})"]
    rng = np.random.default_rng(0)
    accepted = rejected = 0
    for _ in range(500):
        names = ["".join(rng.choice(unsafe) if rng.random() < 0.08 else rng.choice(safe)
                         for _ in range(rng.integers(1, 6))) for _ in range(3)]
        clean = [clean_field(n) for n in names]
        if None in clean:
            rejected += 1
            with pytest.raises(GmemError, match="cannot be written in a memory call"):
                format_write([names])
            continue
        accepted += 1
        assert parse_calls("x " + format_write([names]) + " y") == [
            WriteCall((Triple(*clean),), 2, 2 + len(format_write([names])))]
        q = ReadQuery(names[0], names[1], None)
        (read,) = parse_calls(format_read([q, ReadQuery(None, names[1], names[2])], [names[2], names[0]]))
        assert read.queries == (ReadQuery(clean[0], clean[1], None), ReadQuery(None, clean[1], clean[2]))
        assert read.results == (clean[2], clean[0])
        assert pending_read("so " + format_read([q])) == PendingRead((ReadQuery(clean[0], clean[1], None),), 3)
    assert accepted > 50 and rejected > 50  # both branches really exercised


def test_nested_call_abandons_the_outer_one(caplog):
    text = "({MEM_WRITE--> a>>b>>({MEM_READ(x>>y>>)--> z})>>c}) tail"
    with caplog.at_level(logging.WARNING, logger="gmem_jax.memllm.calls"):
        calls = parse_calls(text)
    assert calls == [ReadCall((ReadQuery("x", "y", None),), ("z",), text.index("({MEM_READ"), text.index("})") + 2)]
    assert "abandoned" in caplog.text


def test_truncated_and_malformed_calls_are_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="gmem_jax.memllm.calls"):
        assert parse_calls("({MEM_WRITE--> a>>b>>c") == []
        assert "unterminated" in caplog.text
        caplog.clear()
        assert parse_calls("({MEM_WRITE--> a>>b>>c", final=False) == []  # may still be being generated
        assert caplog.text == ""
        cases = [
            "({MEM_WRITE a>>b>>c})",  # no arrow
            "({MEM_WRITE--> a>>b})",  # two slots
            "({MEM_WRITE--> a>>b>>c>>d})",  # four slots
            "({MEM_WRITE--> >>b>>c})",  # empty subject
            "({MEM_READ(a>>b>>c)--> x})",  # nothing asked
            "({MEM_READ(>>b>>)--> x})",  # nothing known
            "({MEM_READ(a>>b>>)})",  # no arrow
            "({MEM_READ a>>b>> --> x})",  # no parentheses
            "({MEM_DELETE--> a>>b>>c})",  # unknown kind
            "({MEM_WRITE--> a>>b\x00>>c})",  # control character
        ]
        for text in cases:
            assert parse_calls(text) == [], text
    # Good items survive next to bad ones.
    (w,) = parse_calls("({MEM_WRITE--> a>>b;c>>d>>e;;f>>g>>h>>i})")
    assert w.triples == (Triple("c", "d", "e"),)
    (r,) = parse_calls("({MEM_READ(a>>b>>c;a>>b>>)--> x})")
    assert r.queries == (ReadQuery("a", "b", None),)


def test_not_calls_are_left_alone():
    for text in ["f({x: 1})", "({mem_write--> a>>b>>c})", "({ MEMWRITE--> a>>b>>c})", "a >> b >> c", "})({", ""]:
        assert parse_calls(text) == []
    # Fullwidth lookalikes are not delimiters, so this is one triple whose names contain them.
    assert parse_calls("({MEM_WRITE--> a＞＞b>>c>>d})")[0].triples == (Triple("a＞＞b", "c", "d"),)


def test_hostile_inputs_are_bounded_and_inert(tmp_path):
    # Huge inputs: thousands of openers with no closer, or before a single closer, scan in linear time.
    for text in ["({MEM_WRITE-->" * 200_000, "({MEM_READ(" * 200_000 + "a>>b>>)--> c})", "})" * 300_000,
                 "({" * 300_000 + "MEM_WRITE--> a>>b>>c})"]:
        t0 = time.perf_counter()
        calls = parse_calls(text)
        assert time.perf_counter() - t0 < 2.0
        assert len(calls) <= 1
    assert parse_calls("({" * 300_000 + "MEM_WRITE--> a>>b>>c})")[0].triples == (Triple("a", "b", "c"),)
    # Size caps.
    assert parse_calls("({MEM_WRITE--> " + "x" * MAX_CALL_CHARS + ">>b>>c})") == []
    assert parse_calls("({MEM_WRITE--> " + "a" * 300 + ">>b>>c})") == []  # name too long
    many = ";".join(f"s{i}>>r>>o{i}" for i in range(MAX_ITEMS + 1))
    assert parse_calls("({MEM_WRITE--> " + many + "})") == []
    assert len(parse_calls("({MEM_WRITE--> " + many.rsplit(";", 1)[0] + "})")[0].triples) == MAX_ITEMS
    # Injection-looking names are just names: nothing is evaluated, SQL parameters keep them inert.
    text = ("({MEM_WRITE--> Robert'); DROP TABLE triples--"
            ">>__import__('os').system('rm -rf /')>>${HOME} `whoami` %s %n})")
    assert parse_calls(text) == []  # the ';' splits it into two malformed items
    text = "({MEM_WRITE--> Robert') DROP TABLE triples-->>__import__('os').system('x')>>$HOME `whoami` %s})"
    (w,) = parse_calls(text)
    with TripleStore(tmp_path / "m.sqlite") as store:
        store.insert(w.triples)
        assert store.triples() == list(w.triples)
        assert store.read(ReadQuery("Robert') DROP TABLE triples--", "__import__('os').system('x')", None)) == \
            ["$HOME `whoami` %s"]
    # Unicode names, including right-to-left and emoji.
    (w,) = parse_calls("({MEM_WRITE--> Zürich>>located in>>Schweiz;東京>>首都>>日本;שלום>>means>>peace 😀})")
    assert [t.subject for t in w.triples] == ["Zürich", "東京", "שלום"] and w.triples[2].object == "peace 😀"


def test_warnings_are_capped(caplog):
    with caplog.at_level(logging.WARNING, logger="gmem_jax.memllm.calls"):
        parse_calls("({MEM_WRITE--> x})" * 1000)
    assert len(caplog.records) == 6 and "995 more" in caplog.records[-1].getMessage()


def test_pending_read_detection():
    assert pending_read("The answer is ({MEM_READ(Barack Obama>>born in>>;>>capital of>>France)-->") == \
        PendingRead((OBAMA, FRANCE), 14)
    assert pending_read("x ({ MEM_READ( Barack Obama >> born in >> ) -->  \n") == PendingRead((OBAMA,), 2)
    assert pending_read("({MEM_WRITE-->") is None  # a write's arrow
    assert pending_read("({MEM_READ(a>>b>>)--> c}) and -->") is None  # already answered and closed
    assert pending_read("({MEM_READ(a>>b>>)--> c -->") == PendingRead((), 0)  # garbage after the queries
    assert pending_read("({MEM_READ(a>>b>>)--> c") is None  # no arrow at the end
    assert pending_read("just an arrow -->") is None
    assert pending_read("({MEM_READ(a>>b>>)--> x}) ({MEM_READ(>>r>>o)-->") == \
        PendingRead((ReadQuery(None, "r", "o"),), 26)
    # Malformed: the host must still close it, so it is reported with no queries.
    assert pending_read("({MEM_READ(a>>b>>c)-->") == PendingRead((), 0)
    assert pending_read("({MEM_READ a>>b>>-->") == PendingRead((), 0)
    # Nested in an unfinished write: the read is what is open now.
    assert pending_read("({MEM_WRITE--> a>>({MEM_READ(x>>y>>)-->") == PendingRead((ReadQuery("x", "y", None),), 18)
    # Bounded work on huge text.
    t0 = time.perf_counter()
    assert pending_read("({" * 500_000 + "-->") is None
    assert pending_read("x" * 1_000_000 + "({MEM_READ(a>>b>>)-->") == PendingRead((ReadQuery("a", "b", None),),
                                                                               1_000_000)
    assert time.perf_counter() - t0 < 1.0


def test_formatting_rejects_unwritable_input():
    with pytest.raises(GmemError, match="at least one triple"):
        format_write([])
    with pytest.raises(GmemError, match="triple #0 relation"):
        format_write([("a", "b>c", "d")])
    with pytest.raises(GmemError, match="exactly one"):
        format_read([ReadQuery("a", "b", "c")])
    with pytest.raises(GmemError, match="read result"):
        format_results(["ok", "a;b"])
    assert clean_field("  Barack Obama ") == "Barack Obama"
    assert [clean_field(x) for x in ["", "  ", "a;b", "a}", "{a", "a>b", "a\nb", "x" * 257]] == [None] * 8
