"""Small-scale replication of the paper's Table 2: one-round GRPO vs MGRPO vs intrinsic self-correction, one seed.

From one seed and the same problems it:

1. trains one-round GRPO (layer 2 off) for ``--steps`` steps, validating every ``--val-every`` steps;
2. trains MGRPO (both layers) the same way, from the same initial weights and the same problem order;
3. evaluates the untrained model with the intrinsic self-correction prompt (turn 2 in a new user message), and the
   two trained checkpoints with MGRPO's protocol (turn 2 continues the answer after a guide phrase);
4. writes ``table.md`` / ``table.csv`` (Benchmark, Method, Acc@t1, Acc@t2, Δ, Δi→c, Δc→i), ``training.png``
   (Acc@t1, Acc@t2, Δi→c and Δc→i over the training steps of both runs), ``run.json`` (command, times, paths) and
   the per-problem JSONL of each evaluation under ``eval/`` into ``--out``. Checkpoints and TensorBoard logs go to
   ``--work`` (they are large; ``--reuse-runs`` evaluates the runs found there instead of training again).

The default size is the CPU demo: SmolLM2-135M-Instruct on the bundled single-digit additions, on which it starts at
about 30% at temperature 0.7 (``scripts/probe_demo_difficulty.py``), so rewards can move. The evaluation set is the
training distribution itself (``--test``; the 100 single-digit sums are all there are), sampled ``--eval-samples``
times per problem at temperature 0.7. Nothing is tuned to the result: the settings are the demo's.

    python scripts/replicate.py --out docs/replication                 # CPU, the default size
    python scripts/replicate.py --config configs/paper.yaml --steps 300 --out runs/replication_7b \\
        -- --model.model=Qwen/Qwen2.5-Math-7B --trainer.accelerator=gpu   # a GPU run (see configs/paper.yaml)

Arguments after ``--`` go to every `mgrpo fit` and `mgrpo test` call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mgrpo_pl.cli import cli_main
from mgrpo_pl.report import csv_table, markdown_table, summarize

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
INTRINSIC = str(ROOT / "configs" / "baselines" / "intrinsic.yaml")
GRPO = str(ROOT / "configs" / "baselines" / "grpo.yaml")
DEFAULT_TEST = '[{source: jsonl, name: add_1digit, options: {path: "bundled:add_1digit", id_field: id}}]'


def _sibling(name: str):  # noqa: ANN202 - a script module
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return __import__(name)


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
    argv += [
        f"--seed_everything={args.seed}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.check_val_every_n_epoch=null",
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
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="the base config")
    parser.add_argument("--out", default="runs/replication", help="folder for the table, plot and evaluation JSONL")
    parser.add_argument("--work", default="runs/replication_work", help="folder for checkpoints and training logs")
    parser.add_argument(
        "--reuse-runs", action="store_true", help="evaluate the training runs already in --work instead of training"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
    parser.add_argument("--val-every", type=int, default=5, help="validate every N steps (curves in the plot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", default=DEFAULT_TEST, help="the --data.test list evaluated for the table")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per problem at evaluation")
    args = parser.parse_args(own)
    if args.steps < 1 or args.val_every < 1:
        parser.error("--steps and --val-every must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_table = _sibling("eval_table")
    timings: dict[str, float] = {}

    runs = {}
    for method, configs in (("GRPO", [args.config, GRPO]), ("MGRPO", [args.config])):
        start = time.perf_counter()
        runs[method] = train(method, configs, args, extra)
        timings[f"train {method}"] = time.perf_counter() - start

    test_args = [f"--data.test={args.test}", f"--data.rollout.eval_samples={args.eval_samples}", *extra]
    evaluations = (
        ("Intrinsic self-correction (untrained)", [args.config, INTRINSIC], None),
        ("GRPO", [args.config], runs["GRPO"][0]),
        ("MGRPO", [args.config], runs["MGRPO"][0]),
    )
    rows = []
    for method, configs, ckpt in evaluations:
        start = time.perf_counter()
        for bench, records in eval_table.run_one(method, configs, ckpt, out / "eval", test_args).items():
            rows.append((bench, method, summarize(records)))
        timings[f"evaluate {method}"] = time.perf_counter() - start
    rows.sort(key=lambda r: r[0])

    (out / "table.md").write_text(markdown_table(rows) + "\n")
    (out / "table.csv").write_text(csv_table(rows))
    plot = _sibling("plot_training")
    plot.plot([runs["GRPO"][1], runs["MGRPO"][1]], ["GRPO", "MGRPO"], out / "training.png", window=5)
    report = {
        "command": "python scripts/replicate.py " + " ".join(argv),
        "seed": args.seed,
        "steps": args.steps,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "checkpoints": {m: r[0] for m, r in runs.items()},
        "log_dirs": {m: r[1] for m, r in runs.items()},
    }
    (out / "run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(rows))
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.0f} s")
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'training.png'} and {out / 'run.json'}")
    return report


if __name__ == "__main__":
    main()
