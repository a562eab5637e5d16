"""The pre-registered self-correction experiment: one-round GRPO vs MGRPO vs two untrained baselines, one seed.

From one seed and the same problem order it:

1. trains one-round GRPO (layer 2 off) and MGRPO (both layers) from the same initial weights, validating on the
   way (the curves in the plot);
2. evaluates, on the config's held-out ``data.test``, ``--eval-samples`` samples per problem:
   the untrained model with the intrinsic self-correction prompt (turn 2 in a new user message), the untrained model
   with MGRPO's continuation protocol, and both trained checkpoints with the continuation protocol; with
   ``--second-guide`` the MGRPO checkpoint once more with another fixed turn-2 phrase (the headline row's check);
3. writes ``table.md`` / ``table.csv`` (the Table-2 rows), ``stats.md`` / ``stats.json`` (exact McNemar tests on
   each arm's t1->t2 discordant pairs; paired bootstrap 95% CIs over problems against GRPO,
   ``scripts/replication_stats.py``), ``audit.md`` (every i->c and c->i case sorted into categories,
   ``scripts/audit_transitions.py``), ``training.png`` (Acc@t1, Acc@t2, i->c and c->i over the training steps),
   ``run.json`` (command, times, paths) and the per-problem JSONL of each evaluation under ``eval/`` into ``--out``.
   Checkpoints and TensorBoard logs go to ``--work`` (large; ``--reuse-runs`` evaluates the runs found there).

The default is ``configs/replication/sum2.yaml``: SmolLM2-135M-Instruct adding two digits (seven phrasings), answers
read by the value rules, trained on ``bundled:sum2_train`` and evaluated on the disjoint ``bundled:sum2_test``; its
steps and validation interval are the config's unless ``--steps`` / ``--val-every`` say otherwise. The criteria it is
judged by are written in ``docs/replication/README.md`` before it is run.

    python -m scripts.replicate --out docs/replication --second-guide "Let me re-add the numbers to be sure."
    python -m scripts.replicate --config configs/paper.yaml --steps 300 --out runs/replication_7b \\
        -- --model.model=Qwen/Qwen2.5-Math-7B --trainer.accelerator=gpu   # a GPU run (see configs/paper.yaml)

Arguments after ``--`` go to every `mgrpo fit` and `mgrpo test` call.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
from pathlib import Path

from mgrpo_pl.cli import cli_main
from mgrpo_pl.metrics.report import csv_table, markdown_table, summarize

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
INTRINSIC = str(ROOT / "configs" / "baselines" / "intrinsic.yaml")
GRPO = str(ROOT / "configs" / "baselines" / "grpo.yaml")
DEFAULT_CONFIG = str(ROOT / "configs" / "replication" / "sum2.yaml")


def _sibling(name: str):  # noqa: ANN202 - a script module
    """Another script of the package, imported when needed (some pull in matplotlib or scipy)."""
    return importlib.import_module(f"scripts.{name}")


def _printed(main, argv: list[str]) -> str:  # noqa: ANN001 - a sibling script's main
    """What ``main(argv)`` prints."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return buffer.getvalue()


def finished_run(root: Path) -> tuple[str, str] | None:
    """(checkpoint, log folder) of a training run already under ``root``: its last.ckpt, else its newest one."""
    ckpts = sorted(root.glob("lightning_logs/version_*/checkpoints/*.ckpt"), key=lambda c: c.stat().st_mtime)
    if not ckpts:
        return None
    last = [c for c in ckpts if c.name == "last.ckpt"]
    ckpt = (last or ckpts)[-1]
    return str(ckpt), str(ckpt.parent.parent)


def train(method: str, configs: list[str], args: argparse.Namespace, extra: list[str]) -> tuple[str, str]:
    """One `mgrpo fit`; returns (checkpoint path, TensorBoard log folder)."""
    root = Path(args.work) / method
    if args.reuse_runs:
        found = finished_run(root)
        if found is not None:
            print(f"{method}: reusing {found[0]}")
            return found
    argv = ["fit"]
    for config in configs:
        argv += ["--config", config]
    argv += [f"--seed_everything={args.seed}", "--trainer.check_val_every_n_epoch=null"]
    if args.steps is not None:
        argv.append(f"--trainer.max_steps={args.steps}")
    if args.val_every is not None:
        argv.append(f"--trainer.val_check_interval={args.val_every}")
    argv += [
        f"--trainer.default_root_dir={root}",
        f"--model.results_dir={root / 'val'}",
        *extra,
    ]
    cli = cli_main(argv)
    ckpt = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    if not ckpt:
        raise SystemExit(f"{method}: the fit saved no checkpoint under {root}")
    return ckpt, cli.trainer.logger.log_dir


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the base config")
    parser.add_argument("--out", default="runs/replication", help="folder for the table, plot and evaluation JSONL")
    parser.add_argument("--work", default="runs/replication_work", help="folder for checkpoints and training logs")
    parser.add_argument(
        "--reuse-runs", action="store_true", help="evaluate the training runs already in --work instead of training"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps of each training run (default: the config's)")
    parser.add_argument("--val-every", type=int, help="validate every N steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", help="the --data.test list evaluated for the table (default: the config's)")
    parser.add_argument("--second-guide", help="evaluate MGRPO once more with this fixed turn-2 phrase")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per problem at evaluation")
    args = parser.parse_args(own)
    if (args.steps is not None and args.steps < 1) or (args.val_every is not None and args.val_every < 1):
        parser.error("--steps and --val-every must be >= 1")
    if args.second_guide is not None and not args.second_guide.strip():
        parser.error("--second-guide is blank")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_table = _sibling("eval_table")
    timings: dict[str, float] = {}

    runs = {}
    for method, configs in (("GRPO", [args.config, GRPO]), ("MGRPO", [args.config])):
        start = time.perf_counter()
        runs[method] = train(method, configs, args, extra)
        timings[f"train {method}"] = time.perf_counter() - start

    test_args = [f"--data.rollout.eval_samples={args.eval_samples}", *extra]
    if args.test is not None:
        test_args.insert(0, f"--data.test={args.test}")
    evaluations = [
        ("Intrinsic self-correction (untrained)", [args.config, INTRINSIC], None, []),
        ("Untrained (continuation)", [args.config], None, []),
        ("GRPO", [args.config], runs["GRPO"][0], []),
        ("MGRPO", [args.config], runs["MGRPO"][0], []),
    ]
    if args.second_guide is not None:
        guide = [f"--data.rollout.eval_guide={args.second_guide}"]
        evaluations.append(("MGRPO (second guide)", [args.config], runs["MGRPO"][0], guide))
    rows = []
    arms: dict[str, list[Path]] = {}
    for method, configs, ckpt, more in evaluations:
        start = time.perf_counter()
        for bench, records in eval_table.run_one(method, configs, ckpt, out / "eval", [*test_args, *more]).items():
            rows.append((bench, method, summarize(records)))
        arms[method] = sorted((out / "eval" / eval_table.slug(method)).glob("test_*.jsonl"))
        timings[f"evaluate {method}"] = time.perf_counter() - start
    rows.sort(key=lambda r: r[0])
    if all(len(paths) == 1 for paths in arms.values()):  # the tests and the audit compare one test set per arm
        stats_args = [a for method, paths in arms.items() for a in ("--arm", f"{method}={paths[0]}")]
        (out / "stats.md").write_text(
            _printed(_sibling("replication_stats").main, [*stats_args, "--json", str(out / "stats.json")])
        )
        (out / "audit.md").write_text(
            _printed(_sibling("audit_transitions").main, [f"{m}={p[0]}" for m, p in arms.items()])
        )

    (out / "table.md").write_text(markdown_table(rows) + "\n")
    (out / "table.csv").write_text(csv_table(rows))
    plot = _sibling("plot_training")
    plot.plot([runs["GRPO"][1], runs["MGRPO"][1]], ["GRPO", "MGRPO"], out / "training.png", window=5)
    report = {
        "command": "python -m scripts.replicate " + " ".join(argv),
        "seed": args.seed,
        "steps": args.steps,
        "second_guide": args.second_guide,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "checkpoints": {m: r[0] for m, r in runs.items()},
        "log_dirs": {m: r[1] for m, r in runs.items()},
    }
    (out / "run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(rows))
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.0f} s")
    print((out / "stats.md").read_text() if (out / "stats.md").exists() else "")
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, stats.md, audit.md, {out / 'training.png'} and run.json")
    return report


if __name__ == "__main__":
    main()
