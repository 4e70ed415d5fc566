"""Synthetic multi-hop recall: made-up people, cities, countries and regions, stated in the context, queried in
the last segment. No external data; deterministic by seed.

A world links levels person -> city -> country -> region ("Kalo lives in Mive." "Mive is in Torapa."
"Torapa is part of Sune."). Each example states the full chains (down to the deepest level any question in
`hops` needs) of `n_people` people, plus `n_distractors` statements of other relations ("Kalo knows Pemi.",
"Kalo visited Dusa.", "Mive is near Dusa."), all shuffled into the context segments. The last segment asks
about one of the people: hop 1 "Where does Kalo live?" (a city), hop 2 "In which country does Kalo live?",
hop 3 "In which region does Kalo live?". The facts it needs are never in the last segment.

Names are pseudo-words built from syllables (a fixed lexicon, `lexicon_seed`), so a pretrained model has no
prior about them, and every answer is drawn uniformly from its level's lexicon: the chance level of a hop-h
question is exactly 1 / (number of names at level h) (`chance_level`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.tasks.base import QA_PROMPT, SegmentedExample, Task, check_dims
from gmem_jax.tasks.metrics import answer_em, grouped_mean
from gmem_jax.tasks.segment import sentence_units

LEVELS = ("person", "city", "country", "region")
LINKS = {1: "{a} lives in {b}.", 2: "{a} is in {b}.", 3: "{a} is part of {b}."}  # level h-1 -> level h
QUESTIONS = {1: "Where does {p} live?", 2: "In which country does {p} live?", 3: "In which region does {p} live?"}
DISTRACTORS = (("{a} knows {b}.", "person", "person"), ("{a} visited {b}.", "person", "city"),
               ("{a} is near {b}.", "city", "city"))
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
SPLIT_STREAMS = {"train": 0, "dev": 1, "test": 2}


def make_lexicon(sizes: Sequence[int], seed: int = 0) -> dict[str, list[str]]:
    """Distinct two-syllable capitalised pseudo-words for each level (sizes in LEVELS order)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    pool = [(a + b).capitalize() for a in syllables for b in syllables]
    if sum(sizes) > len(pool):
        raise GmemError(f"synthetic: {sum(sizes)} names requested but only {len(pool)} exist; use smaller lexicons")
    names = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:sum(sizes)]]
    bounds = np.cumsum([0, *sizes])
    return {level: names[bounds[i]:bounds[i + 1]] for i, level in enumerate(LEVELS)}


class SyntheticTask(Task):
    """The synthetic recall task. `hops`: question depths to mix (each example draws one); `n_people`: people
    whose chains are stated (the asked one among them); `n_distractors`: extra statements of other relations;
    `lexicon_sizes`: names per level (person, city, country, region); `n_examples`: examples per split."""

    name = "synthetic"

    def __init__(self, *, hops: Sequence[int] = (1, 2), n_people: int = 4, n_distractors: int = 4,
                 lexicon_sizes: Sequence[int] = (64, 32, 16, 8), lexicon_seed: int = 0,
                 n_examples: Mapping[str, int] | None = None, layout: str = "memory", window: int | None = None,
                 overflow: str = "drop_oldest"):
        super().__init__(layout=layout, window=window, overflow=overflow)
        if not hops or not set(hops) <= set(QUESTIONS):
            raise GmemError(f"synthetic: hops={tuple(hops)}; use values in {sorted(QUESTIONS)}")
        if len(lexicon_sizes) != len(LEVELS) or min(lexicon_sizes) < 2:
            raise GmemError(f"synthetic: lexicon_sizes={tuple(lexicon_sizes)} needs {len(LEVELS)} sizes >= 2")
        if not 1 <= n_people <= lexicon_sizes[0] or n_distractors < 0:
            raise GmemError(f"synthetic: need 1 <= n_people <= {lexicon_sizes[0]} and n_distractors >= 0, got "
                            f"n_people={n_people}, n_distractors={n_distractors}")
        self.hops, self.n_people, self.n_distractors = tuple(sorted(set(hops))), n_people, n_distractors
        self.lexicon = make_lexicon(lexicon_sizes, lexicon_seed)
        self.n_examples = {"train": 10000, "dev": 500, "test": 500, **(n_examples or {})}

    def candidates(self, hop: int) -> list[str]:
        """Every possible answer of a hop-h question."""
        return list(self.lexicon[LEVELS[hop]])

    def chance_level(self, hop: int | None = None) -> float:
        """Accuracy of a uniform guess among the candidates: for one hop, or averaged over `hops` (each example
        draws its hop uniformly)."""
        hops = self.hops if hop is None else (hop,)
        return float(np.mean([1.0 / len(self.candidates(h)) for h in hops]))

    def world(self, rng: np.random.Generator) -> tuple[list[str], list[str], list[int], int, str, list[str]]:
        """One example's statements: (sentences, question, supporting-statement indices, hop, answer, the other
        people's answers to the same question that differ from it (what a memory that binds facts to the wrong
        person would say))."""
        lex, depth = self.lexicon, max(self.hops)
        hop = int(rng.choice(self.hops))
        people = [lex["person"][i] for i in rng.choice(len(lex["person"]), self.n_people, replace=False)]
        link: dict[str, str] = {}  # entity -> its entity one level down the chain
        statements: dict[str, int] = {}  # sentence -> first index (dict keeps order, drops repeats)
        for p in people:
            a = p
            for h in range(1, depth + 1):
                if a not in link:
                    link[a] = lex[LEVELS[h]][int(rng.integers(len(lex[LEVELS[h]])))]
                    statements.setdefault(LINKS[h].format(a=a, b=link[a]), len(statements))
                a = link[a]
        n_chain = len(statements)
        for _ in range(100 * self.n_distractors):  # distinct distractors; the pool is far larger than needed
            if len(statements) >= n_chain + self.n_distractors:
                break
            template, la, lb = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
            a, b = (lex[lv][int(rng.integers(len(lex[lv])))] for lv in (la, lb))
            if a != b:
                statements.setdefault(template.format(a=a, b=b), len(statements))
        sentences = list(statements)
        order = rng.permutation(len(sentences))
        sentences = [sentences[i] for i in order]
        target, chain, a = people[0], [], people[0]
        for h in range(1, hop + 1):
            chain.append(LINKS[h].format(a=a, b=link[a]))
            a = link[a]
        support = [sentences.index(s) for s in chain]
        others = []
        for p in people[1:]:
            for _ in range(hop):
                p = link[p]
            if p != a and p not in others:
                others.append(p)
        return sentences, QUESTIONS[hop].format(p=target), support, hop, a, others

    def examples(self, split: str, tokenizer: Any, *, n_seg: int, seg_len: int, max_sents: int, seed: int = 0,
                 limit: int | None = None) -> list[SegmentedExample]:
        """n_examples[split] examples (or `limit`); example i is drawn from (seed, split, i) alone."""
        check_dims(self.name, n_seg, seg_len, max_sents)
        if split not in SPLIT_STREAMS:
            raise GmemError(f"synthetic: unknown split {split!r}; use one of {', '.join(SPLIT_STREAMS)}")
        n = self.n_examples[split] if limit is None else min(limit, self.n_examples[split])
        out = []
        for i in range(n):
            sentences, question, support, hop, answer, others = self.world(
                np.random.default_rng([seed, SPLIT_STREAMS[split], i]))
            units = sentence_units(tokenizer, sentences, keys=[("fact", k) for k in range(len(sentences))],
                                   labels=[float(k in support) for k in range(len(sentences))])
            meta = {"id": f"synthetic-{split}-{seed}-{i}", "task": self.name, "answers": [answer], "hop": hop,
                    "chance": 1.0 / len(self.candidates(hop)), "other_answers": others,
                    "supporting_facts": [["fact", k] for k in support]}
            out.append(self.build(tokenizer, units, question, answer, meta, n_seg=n_seg, seg_len=seg_len,
                                  max_sents=max_sents))
        return out

    def score(self, predictions: Mapping[str, Mapping[str, Any]], examples: Sequence[SegmentedExample]
              ) -> dict[str, float]:
        """'em' and 'hop{h}_em' (normalized exact match; missing prediction = 0), with the chance level of the
        same examples ('chance', 'hop{h}_chance'), and 'other_person' / 'hop{h}_other_person': the share of
        examples answered with another stated person's answer (a fact bound to the wrong subject)."""
        em = lambda ex: answer_em(predictions, ex)  # noqa: E731
        other = lambda ex: answer_em(predictions, ex, key="other_answers")  # noqa: E731
        chance = lambda ex: ex.meta["chance"]  # noqa: E731
        hop = lambda ex: f"hop{ex.meta['hop']}"  # noqa: E731
        everything = lambda ex: ""  # noqa: E731
        out = {f"{k}_em": v for k, v in grouped_mean(examples, em, hop).items()}
        out.update({f"{k}_chance": v for k, v in grouped_mean(examples, chance, hop).items()})
        out.update({f"{k}_other_person": v for k, v in grouped_mean(examples, other, hop).items()})
        out["other_person"] = grouped_mean(examples, other, everything)[""]
        out["em"] = grouped_mean(examples, em, everything)[""]
        out["chance"] = grouped_mean(examples, chance, everything)[""]
        return out

    def texts(self, split: str = "train") -> Iterable[str]:
        """Every word the task uses (the same for all splits): templates and all names."""
        yield QA_PROMPT.format(question="")
        yield from (t.format(a="", b="") for t in LINKS.values())
        yield from (t.format(p="") for t in QUESTIONS.values())
        yield from (t.format(a="", b="") for t, _, _ in DISTRACTORS)
        for names in self.lexicon.values():
            yield from names
