"""How well does a trained HotpotQA run's supporting-fact head rank the gold sentences? (An analysis script for
docs/results.md, not part of the package.)

    PYTHONPATH=. python docs/analysis/hotpot_sp_scores.py <workdir> [<workdir> ...]

For each run of configs/smollm2_hotpotqa.py, on its 23 distractor dev questions (teacher-forced, the same pass
the evaluation scores supporting facts from): the head's probabilities (sigmoid of `sp_logits`) for gold and for
other sentences, the ranking AUC of gold over other sentences, and the sentence F1 a fixed top-k rule would get
(k = 1, 2, 3). Only the sentences the memory layout kept are counted (`sent_mask`), so gold sentences dropped for
length are missing from both sides: a diagnostic of the head, not a HotpotQA score.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np

from configs.smollm2_hotpotqa import get_config
from gmem_jax.memory.model import forward_segments
from gmem_jax.tasks.hotpot_metrics import sp_scores
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory


def sentence_f1(scores: np.ndarray, gold: np.ndarray, k: int) -> float:
    """F1 of predicting the k highest-scoring sentences of one question [sentences] against its gold [sentences],
    by the official metric's set F1 (`hotpot_metrics.sp_scores`, sentence indices standing for (title, sent_id))."""
    top = [(int(i),) for i in np.argsort(-scores)[:k]]
    return sp_scores(top, [(int(i),) for i in np.flatnonzero(gold)])[1]


def main(workdirs: list[str]) -> None:
    config = get_config()
    _, _, cfg, frozen, examples = builders.eval_setup(config)
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        if not mcfg.sp_head:
            raise SystemExit(f"{wd}: trained without memory.sp_head; nothing to score")
        use_memory = json.loads((Path(wd) / "config.json").read_text())["train"]["use_memory"]
        run = jax.jit(lambda p, f, b: forward_segments(p, f, b, cfg, mcfg, use_memory=use_memory).sp_logits)
        per_question = []
        for start in range(0, len(examples), config.eval.batch_size):
            b = collate(examples[start:start + config.eval.batch_size])
            probs = np.asarray(jax.nn.sigmoid(run(params, frozen, b)))  # [B, N, max_sents]
            for p, label, mask in zip(probs, b["sent_label"], b["sent_mask"]):
                per_question.append((p[mask], label[mask]))
        scores = np.concatenate([p for p, _ in per_question])
        gold = np.concatenate([g for _, g in per_question]) > 0
        pos, neg = scores[gold], scores[~gold]
        auc = float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
        f1 = [100 * np.mean([sentence_f1(p, g, k) for p, g in per_question if g.sum()]) for k in (1, 2, 3)]
        print(f"{Path(wd).name}: {len(scores)} kept sentences, {len(pos)} gold ({100 * len(pos) / len(scores):.1f}%); "
              f"p(gold) mean {pos.mean():.3f} max {pos.max():.3f}; p(other) mean {neg.mean():.3f} max {neg.max():.3f}; "
              f"AUC {auc:.3f}; >= 0.5: {int((scores >= 0.5).sum())}; top-k sentence F1 (k = 1, 2, 3) "
              + " / ".join(f"{x:.1f}" for x in f1))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
