"""`python -m gmem_jax.evaluate ...`

  --config configs/X.py --workdir DIR [--baseline_workdir DIR2] [--output_dir OUT] [--config.key=value ...]
      evaluate the memory trained in DIR on the config's eval split next to its baselines, in one harness:
        memory      the trained memory (context written into memory, every token reads it)
        no_memory   the same trainable modules trained with memory disabled (from --baseline_workdir, a run of
                    the same config with --config.train.use_memory=False; such a run given as --workdir alone
                    is scored as no_memory, and each workdir given in the wrong role is refused)
        frozen      the frozen backbone alone, question only
        in_prompt   the frozen backbone with as much context as fits in its prompt (last segment); skipped
                    with --config.eval.baselines=False (the frozen column stays: locality is judged against it)
      writes eval_results.json and results.md (a Markdown table) to OUT (default DIR). --reliance_only: only
      probe whether the memory is relied on (answer-token accuracy reading its own / another example's / the empty
      memory; per example kind on ZsRE, with locality as agreement with the frozen model) and write
      reliance.json. The eval config may
      differ from the training one where the memory allows it, e.g. a longer context (more segments), or
      --config.eval.scope_gate_threshold=0.5 (a hard in-scope decision on a trained scope gate).
  hotpotqa PRED.json GOLD.json
      the official HotpotQA metrics of a prediction file (prints JSON)
  plot METRIC OUT.png LABEL=DIR [LABEL=DIR ...]
      one line per system of METRIC across several eval_results.json (in DIR), e.g. LABEL = the context length
  curves METRIC OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]
      one line per training run of METRIC (from its metrics.jsonl) against the step, e.g. two learning rates
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from gmem_jax.errors import GmemError


def evaluate_workdirs(config, workdir: Path, baseline_workdir: Path | None) -> dict:
    from gmem_jax.training import builders
    from gmem_jax.training.checkpoint import load_exported_memory, trained_with_memory
    from gmem_jax.training.evaluation import compare_systems, eval_memory_config

    # A twin's parameters were trained to work with nothing written: scored with a memory they would be neither
    # system, so each workdir is checked for the role it is given (or, alone, scored in its own role).
    with_memory = trained_with_memory(workdir)
    if not with_memory and baseline_workdir is not None:
        raise GmemError(f"--workdir {workdir} was trained with train.use_memory=False (a no-memory twin); pass the "
                        "memory run as --workdir and the twin as --baseline_workdir")
    if baseline_workdir is not None and trained_with_memory(baseline_workdir):
        raise GmemError(f"--baseline_workdir {baseline_workdir} was trained with its memory; the baseline is a run "
                        "of the same config with --config.train.use_memory=False")
    mesh = builders.build_mesh(config)
    task = builders.build_task(config)
    tokenizer = builders.build_tokenizer(config, task)
    cfg, frozen, backbone_id = builders.build_backbone(config, mesh, tokenizer)
    params, mcfg = load_exported_memory(workdir, cfg)
    mcfg = eval_memory_config(config, mcfg)
    trained = {"memory" if with_memory else "no_memory": (params, mcfg, with_memory)}
    if baseline_workdir is not None:
        bparams, bmcfg = load_exported_memory(baseline_workdir, cfg)
        trained["no_memory"] = (bparams, bmcfg, False)  # nothing written: a scope gate would be 0 anyway
    report = compare_systems(config, task_for_layout=lambda lay: builders.build_task(config, lay), tokenizer=tokenizer,
                             frozen=frozen, cfg=cfg, trained=trained)
    report.update(task=config.task.name, split=config.task.eval_split, backbone=backbone_id, memory=mcfg.to_dict())
    return report


def reliance_workdir(config, workdir: Path) -> dict:
    """`memory_reliance` of the memory trained in `workdir` on the config's eval examples (memory layout)."""
    from gmem_jax.training import builders
    from gmem_jax.training.checkpoint import load_exported_memory, trained_with_memory
    from gmem_jax.training.evaluation import eval_memory_config, memory_reliance

    if not trained_with_memory(workdir):
        raise GmemError(f"--workdir {workdir} was trained with train.use_memory=False: it has no memory to rely "
                        "on; probe the memory run")
    _, _, cfg, frozen, examples = builders.eval_setup(config)
    params, mcfg = load_exported_memory(workdir, cfg)
    return memory_reliance(examples, frozen, cfg, params, eval_memory_config(config, mcfg),
                           batch_size=config.eval.batch_size)


def _labelled_files(argv: Sequence[str], command: str, filename: str, hint: str):
    """`METRIC OUT.png LABEL=DIR ...` -> {label: DIR/filename}, or an exit code after printing what is wrong."""
    if len(argv) < 3 or not all("=" in a for a in argv[2:]):
        print(f"usage: python -m gmem_jax.evaluate {command} METRIC OUT.png LABEL=DIR [LABEL=DIR ...]", file=sys.stderr)
        return 2
    files = {}
    for arg in argv[2:]:
        label, _, d = arg.partition("=")
        files[label] = Path(d) / filename
        if not files[label].is_file():
            print(f"error: {files[label]} does not exist; {hint.format(dir=d)}", file=sys.stderr)
            return 2
    return files


def _plot_main(argv: Sequence[str]) -> int:
    from gmem_jax.training.monitor import plot_systems

    files = _labelled_files(argv, "plot", "eval_results.json", "run python -m gmem_jax.evaluate --output_dir {dir} first")
    if isinstance(files, int):
        return files
    print(plot_systems({label: json.loads(f.read_text()) for label, f in files.items()}, argv[0], argv[1]))
    return 0


def _curves_main(argv: Sequence[str]) -> int:
    from gmem_jax.training.monitor import plot_run_curves

    files = _labelled_files(argv, "curves", "metrics.jsonl", "point LABEL= at a training run directory")
    if isinstance(files, int):
        return files
    runs = {label: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for label, f in files.items()}
    try:
        print(plot_run_curves(runs, argv[0], argv[1]))
    except GmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _model_main(argv) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    from gmem_jax.training.evaluation import markdown_table

    config = config_flags.DEFINE_config_file("config", None, "configs/X.py used to train the memory")
    workdir = flags.DEFINE_string("workdir", None, "the trained run's directory")
    baseline = flags.DEFINE_string("baseline_workdir", None, "a run of the same config with train.use_memory=False")
    probe = flags.DEFINE_bool("reliance_only", False, "only probe whether the trained memory is relied on "
                              "(training.evaluation.memory_reliance) and write reliance.json")
    output_dir = flags.DEFINE_string("output_dir", None, "where eval_results.json and results.md go (default: "
                                     "--workdir); e.g. one directory per evaluated context length")

    def run(_):
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        try:
            if probe.value:
                rel = reliance_workdir(config.value, Path(workdir.value))
                out = Path(output_dir.value or workdir.value)
                out.mkdir(parents=True, exist_ok=True)
                (out / "reliance.json").write_text(json.dumps(rel, indent=2, sort_keys=True))
                print(json.dumps(rel, indent=2, sort_keys=True))
                sys.exit(0)
            report = evaluate_workdirs(config.value, Path(workdir.value),
                                       Path(baseline.value) if baseline.value else None)
        except GmemError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        out = Path(output_dir.value or workdir.value)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        (out / "results.md").write_text(markdown_table(report))
        print(markdown_table(report))
        sys.exit(0)

    flags.mark_flags_as_required(["config", "workdir"])
    app.run(run, argv=[sys.argv[0], *argv])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "hotpotqa":
        from gmem_jax.tasks.hotpot_metrics import main as hotpotqa_main

        return hotpotqa_main(argv[1:])
    if argv and argv[0] == "plot":
        return _plot_main(argv[1:])
    if argv and argv[0] == "curves":
        return _curves_main(argv[1:])
    if not argv or not argv[0].startswith("-"):  # neither a subcommand nor flags: show the usage
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return _model_main(argv)


if __name__ == "__main__":
    sys.exit(main())
