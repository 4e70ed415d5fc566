"""`python -m gmem_jax.evaluate --config ... --workdir ...` on a trained tiny run: the systems it scores."""
import json
import subprocess
import sys

import pytest
from trainer_testlib import REPO, STANDARD, TINY, run_env, run_train


def _run_evaluate(workdir, out, *overrides):
    cmd = [sys.executable, "-m", "gmem_jax.evaluate", f"--config={TINY}", f"--workdir={workdir}",
           f"--output_dir={out}", "--config.task.eval_limit=8", *overrides]
    return subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=REPO)


def _evaluate(workdir, out, *overrides):
    proc = _run_evaluate(workdir, out, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    """The standard run's no-memory twin (train.use_memory=False): the (b) baseline of every results table."""
    workdir = tmp_path_factory.mktemp("twin_run")
    run_train(workdir, *STANDARD, "--config.train.use_memory=False")
    return workdir


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


def test_a_twin_is_scored_as_no_memory_alone_or_as_the_baseline_and_refused_in_the_wrong_role(
        standard_run, twin_run, tmp_path):
    lean = ("--config.eval.baselines=False",)
    alone = _evaluate(twin_run, tmp_path / "alone", *lean)
    both = _evaluate(standard_run, tmp_path / "both", f"--baseline_workdir={twin_run}", *lean)
    assert set(alone["results"]) == {"no_memory", "frozen"}
    assert set(both["results"]) == {"memory", "no_memory", "frozen"}
    # Alone, the twin is scored with its memory disabled, as it is as the baseline: the same figures.
    assert alone["results"]["no_memory"] == both["results"]["no_memory"]
    assert alone["predictions"]["no_memory"] == both["predictions"]["no_memory"]

    for args, says in (((twin_run, tmp_path / "swap", f"--baseline_workdir={standard_run}"), "no-memory twin"),
                       ((standard_run, tmp_path / "mem", f"--baseline_workdir={standard_run}"), "trained with its "),
                       ((twin_run, tmp_path / "rel", "--reliance_only"), "no memory to rely on")):
        proc = _run_evaluate(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: ") and says in proc.stderr and proc.stderr.count("\n") == 1
        assert not args[1].exists()  # refused before anything was written
