"""Evaluate several configs / checkpoints with `mgrpo test` and write the paper's Table-2 rows.

Each ``--run`` is ``METHOD=CONFIG[+CONFIG...][@CHECKPOINT]``; every test set in the config becomes one row per
method. The figures are recomputed from the per-problem JSONL each run writes (kept under ``<out>/<method>/``).

    python -m scripts.eval_table --out docs/demo_eval \
        --run "Intrinsic self-correction=configs/demo.yaml+configs/baselines/intrinsic.yaml" \
        --run "MGRPO=configs/demo.yaml@runs/demo/lightning_logs/version_0/checkpoints/last.ckpt" \
        -- --data.test='[{source: gsm8k, name: gsm8k, options: {path: "mathjudger:gsm8k/test", subset_n: 100}}]'

Arguments after ``--`` are passed to every `mgrpo test` call.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from mgrpo_pl.cli import cli_main
from mgrpo_pl.metrics.report import csv_table, load_records, markdown_table, summarize

RESULT_FILE = re.compile(r"^test_(?P<name>.+)_step\d+(?:_rank\d+)?\.jsonl$")


def parse_run(spec: str) -> tuple[str, list[str], str | None]:
    if "=" not in spec:
        raise SystemExit(f"--run {spec!r}: expected METHOD=CONFIG[+CONFIG...][@CHECKPOINT]")
    method, rest = spec.split("=", 1)
    configs, _, ckpt = rest.partition("@")
    return method.strip(), [c for c in configs.split("+") if c], ckpt or None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def run_one(method: str, configs: list[str], ckpt: str | None, out: Path, extra: list[str]) -> dict[str, list]:
    """Run `mgrpo test` for one method; return the records of each test set by name."""
    results = out / slug(method)
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("test_*.jsonl"):
        old.unlink()
    args = ["test"]
    for config in configs:
        args += ["--config", config]
    args += [f"--model.results_dir={results}", f"--trainer.default_root_dir={results}", *extra]
    if ckpt:
        args.append(f"--ckpt_path={ckpt}")
    cli_main(args)
    by_name: dict[str, list] = {}
    for path in sorted(results.glob("test_*.jsonl")):
        match = RESULT_FILE.match(path.name)
        if match:
            by_name.setdefault(match["name"], []).extend(load_records(path))
    if not by_name:
        raise SystemExit(f"{method}: `mgrpo test` wrote no per-problem results under {results}")
    return by_name


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="METHOD=CONFIG[+CONFIG...][@CHECKPOINT]")
    parser.add_argument("--out", default="runs/eval_table", help="folder for table.md, table.csv and the JSONL")
    args = parser.parse_args(own)
    out = Path(args.out)
    rows, timings = [], []
    for spec in args.run:
        method, configs, ckpt = parse_run(spec)
        start = time.perf_counter()
        for bench, records in run_one(method, configs, ckpt, out, extra).items():
            rows.append((bench, method, summarize(records)))
        timings.append((method, time.perf_counter() - start))
    rows.sort(key=lambda r: r[0])  # group by benchmark, methods in --run order
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    (out / "table.csv").write_text(csv_table(rows))
    print(markdown_table(rows))
    for method, seconds in timings:
        print(f"{method}: {seconds:.0f} s")
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")


if __name__ == "__main__":
    main()
