"""`python -m gmem_jax.evaluate --config ... --workdir ...` on a trained tiny run: the systems it scores."""
import json
import subprocess
import sys

from trainer_testlib import REPO, TINY, run_env


def _evaluate(workdir, out, *overrides):
    cmd = [sys.executable, "-m", "gmem_jax.evaluate", f"--config={TINY}", f"--workdir={workdir}",
           f"--output_dir={out}", "--config.task.eval_limit=8", *overrides]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval_results.json").read_text())


def test_evaluate_skips_only_the_in_prompt_baseline_when_baselines_are_off(standard_run, tmp_path):
    full = _evaluate(standard_run, tmp_path / "full", "--config.eval.baselines=True")
    lean = _evaluate(standard_run, tmp_path / "lean", "--config.eval.baselines=False")
    assert set(full["results"]) == {"memory", "frozen", "in_prompt"}
    assert set(lean["results"]) == {"memory", "frozen"}  # frozen stays: ZsRE locality is judged against it
    assert full["examples"] == lean["examples"] == 8
    # The systems both runs score are the same computation on the same examples: identical figures.
    for system in ("memory", "frozen"):
        assert lean["results"][system] == full["results"][system]
        assert lean["predictions"][system] == full["predictions"][system]
    assert "| metric | frozen | memory |\n" in (tmp_path / "lean" / "results.md").read_text()
