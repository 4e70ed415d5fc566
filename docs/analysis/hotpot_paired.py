"""Memory vs its no-memory twin on HotpotQA, question by question, over seeds (an analysis script for
docs/results.md, not part of the package; no model is run).

    PYTHONPATH=. python docs/analysis/hotpot_paired.py <eval_dir> [<eval_dir> ...]

Each directory is one `python -m gmem_jax.evaluate --config configs/smollm2_hotpotqa.py --workdir MEM
--baseline_workdir TWIN --output_dir DIR` (one seed's pair). With 23 questions one question is 4.3 points, so the
table says how many questions each system alone got right, by greedy exact match and by teacher-forced answer
tokens (each question's count of right answer tokens, the EOS included: the finer measure), per seed and summed.
"""
import argparse
import json
from pathlib import Path

from configs.smollm2_hotpotqa import DATA
from gmem_jax.tasks.metrics import exact_match

SYSTEMS = ("memory", "no_memory")


def paired(preds: dict, gold: dict) -> dict:
    """preds {system: {id: prediction}}, gold {id: answer} -> counts of the questions one system beats the other."""
    out = {"questions": len(gold), "mem_only_em": 0, "twin_only_em": 0, "both_em": 0,
           "mem_more_tokens": 0, "twin_more_tokens": 0, "tokens": [0, 0], "targets": 0}
    for qid, answer in gold.items():
        m, t = (preds[s][qid] for s in SYSTEMS)
        em_m, em_t = (exact_match(p["answer"], [answer]) > 0 for p in (m, t))
        out["mem_only_em"] += em_m and not em_t
        out["twin_only_em"] += em_t and not em_m
        out["both_em"] += em_m and em_t
        hm, ht = sum(m["answer_hits"]), sum(t["answer_hits"])
        out["mem_more_tokens"] += hm > ht
        out["twin_more_tokens"] += ht > hm
        out["tokens"][0] += hm
        out["tokens"][1] += ht
        out["targets"] += len(m["answer_hits"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    header = ("run", "em mem / twin", "sp f1 mem / twin", "joint f1 mem / twin", "em: mem only / twin only / both",
              "answer tokens right mem / twin (of)", "questions with more tokens right: mem / twin")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    records = json.loads(Path(f"{DATA}/dev_distractor_23.json").read_text())
    total = None
    for d in args.eval_dirs:
        ev = json.loads((d / "eval_results.json").read_text())
        res, preds = ev["results"], ev["predictions"]
        gold = {r["_id"]: r["answer"] for r in records if r["_id"] in preds["memory"]}
        c = paired(preds, gold)
        pct = lambda s, k: f"{100 * res[s][k]:.1f}"  # noqa: E731
        print(f"| {d.name} | {pct('memory', 'em')} / {pct('no_memory', 'em')} | {pct('memory', 'sp_f1')} / "
              f"{pct('no_memory', 'sp_f1')} | {pct('memory', 'joint_f1')} / {pct('no_memory', 'joint_f1')} | "
              f"{c['mem_only_em']} / {c['twin_only_em']} / {c['both_em']} | {c['tokens'][0]} / {c['tokens'][1]} "
              f"({c['targets']}) | {c['mem_more_tokens']} / {c['twin_more_tokens']} |")
        if total is None:
            total = c
        else:
            for k, v in c.items():
                total[k] = [a + b for a, b in zip(total[k], v)] if isinstance(v, list) else total[k] + v
    if len(args.eval_dirs) > 1:
        print(f"| all | | | | {total['mem_only_em']} / {total['twin_only_em']} / {total['both_em']} | "
              f"{total['tokens'][0]} / {total['tokens'][1]} ({total['targets']}) | "
              f"{total['mem_more_tokens']} / {total['twin_more_tokens']} |")


if __name__ == "__main__":
    main()
