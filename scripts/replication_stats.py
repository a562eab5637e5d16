"""Statistics for a pre-registered self-correction experiment, from the per-problem JSONL that evaluation writes.

Per arm: the Table-2 figures (``metrics.report.summarize``: percent of all (problem, sample) pairs) and an exact
McNemar test of turn 2 against turn 1 (b = #i→c, c = #c→i over all pairs). Between arms: paired bootstrap 95% CIs,
resampling problems, of the headline's Acc@t2 − the reference's Acc@t1 and Acc@t2, and the same two differences for
every other arm.

    python -m scripts.replication_stats --arm GRPO=eval/GRPO/test_gsm8k_step0.jsonl \
        --arm MGRPO=eval/MGRPO/test_gsm8k_step0.jsonl --reference GRPO --headline MGRPO --json stats.json

McNemar counts every (problem, sample) pair as its own trial; with k > 1 samples the pairs of one problem are
correlated, so its p-value is optimistic there, while the bootstrap (which resamples whole problems) is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from mgrpo_pl.metrics.report import COLUMNS, load_records, summarize

KEYS = ("correct_t1", "correct_t2")
# Resampled index rows per chunk times problems stays under this, so 10k draws of a large benchmark fit in memory.
# numpy's generator yields the same indices chunked or not, so the chunk size does not change a result.
_CHUNK_CELLS = 1 << 22


def mcnemar_exact(records: Sequence[dict]) -> dict[str, float]:
    """Exact two-sided McNemar test of turn 2 against turn 1 over all (problem, sample) pairs.

    Returns:
        ``b`` (#wrong at t1, right at t2), ``c`` (#right at t1, wrong at t2), ``n`` (pairs) and ``p``: the exact
        binomial test of b out of b + c at 1/2 (1.0 when b + c = 0: no discordant pair, no evidence).
    """
    b = sum(1 for r in records if not r["correct_t1"] and r["correct_t2"])
    c = sum(1 for r in records if r["correct_t1"] and not r["correct_t2"])
    p = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue if b + c else 1.0
    return {"b": b, "c": c, "n": len(records), "p": float(p)}


def per_problem_means(records: Sequence[dict], key: str) -> dict[str, float]:
    """Mean of ``key`` over each problem's samples, by problem id."""
    if key not in KEYS:
        raise ValueError(f"key must be one of {', '.join(KEYS)}, got {key!r}")
    values: dict[str, list[bool]] = defaultdict(list)
    for i, row in enumerate(records):
        if "problem_id" not in row:
            raise ValueError(f"record {i} has no 'problem_id': the bootstrap pairs arms by problem")
        values[str(row["problem_id"])].append(bool(row[key]))
    return {pid: sum(v) / len(v) for pid, v in values.items()}


def paired_bootstrap_ci(
    records_a: Sequence[dict],
    key_a: str,
    records_b: Sequence[dict],
    key_b: str,
    n_boot: int = 10000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """mean(A's ``key_a``) − mean(B's ``key_b``) over problems, with a paired percentile bootstrap 95% CI.

    Each problem counts once, as the mean over its samples; a replicate draws problems with replacement and takes the
    same problems from both arms (the pairing removes the between-problem difficulty from the spread).

    Returns:
        (diff, lo, hi).

    Raises:
        ValueError: When the arms hold different problem ids, or there are none.
    """
    a, b = per_problem_means(records_a, key_a), per_problem_means(records_b, key_b)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the arms are not paired: only in A {only_a[:5]}, only in B {only_b[:5]}")
    if not a:
        raise ValueError("no problems to bootstrap")
    ids = sorted(a)
    d = np.array([a[i] - b[i] for i in ids])
    n = len(ids)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // n)
    diffs = np.concatenate(
        [d[rng.integers(0, n, size=(min(rows, n_boot - s), n))].mean(axis=1) for s in range(0, n_boot, rows)]
    )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def parse_arm(spec: str, flag: str = "--arm") -> tuple[str, Path]:
    """``NAME=PATH.jsonl`` -> (name, path); the error names ``flag``."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path:
        raise SystemExit(f"{flag} {spec!r}: expected NAME=PATH.jsonl")
    if not Path(path).is_file():
        raise SystemExit(f"{flag} {spec!r}: {path} is not a file")
    return name.strip(), Path(path)


def _pct(summary: dict[str, float], key: str) -> str:
    text = f"{100 * summary[key]:.1f}"
    if summary.get("samples", 1) > 1:
        text += f" ± {100 * summary[f'{key}_std']:.1f}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="NAME=PATH.jsonl (repeatable)")
    parser.add_argument("--reference", default="GRPO", help="the arm the others are compared with")
    parser.add_argument("--headline", default="MGRPO", help="the pre-registered arm of the headline comparison")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    arms: dict[str, list[dict]] = {}
    for spec in args.arm:
        name, path = parse_arm(spec)
        if name in arms:
            raise SystemExit(f"--arm {spec!r}: arm {name!r} given twice")
        try:
            arms[name] = load_records(path)
        except (ValueError, json.JSONDecodeError) as err:
            raise SystemExit(f"--arm {spec!r}: {err}") from err
        if not arms[name]:
            raise SystemExit(f"--arm {spec!r}: {path} holds no records")
    for flag, name in (("--reference", args.reference), ("--headline", args.headline)):
        if name not in arms:
            raise SystemExit(f"{flag} {name!r}: not one of the arms ({', '.join(arms)})")
    if args.headline == args.reference:
        raise SystemExit(f"--headline {args.headline!r}: must differ from --reference")
    if args.n_boot < 1:
        raise SystemExit(f"--n-boot {args.n_boot}: must be at least 1")

    arm_stats: dict[str, dict] = {}
    comparisons: list[dict] = []
    lines = [
        "| Arm | pairs | " + " | ".join(title for _, title in COLUMNS) + " | McNemar b | c | p |",
        "|" + "---|" * (len(COLUMNS) + 5),
    ]
    for name, records in arms.items():
        summary, test = summarize(records), mcnemar_exact(records)
        arm_stats[name] = {**summary, "mcnemar": test}
        cells = " | ".join(_pct(summary, k) for k, _ in COLUMNS)
        lines.append(f"| {name} | {test['n']} | {cells} | {test['b']} | {test['c']} | {test['p']:.4g} |")

    # The headline first (the pre-registered test), then every other arm against the same reference.
    others = [args.headline] + [n for n in arms if n not in (args.headline, args.reference)]
    lines += ["", "| Difference (percentage points) | diff | 95% CI |", "|---|---|---|"]
    ref = arms[args.reference]
    for name in others:
        for ref_key, label in (("correct_t1", "Acc@t1"), ("correct_t2", "Acc@t2")):
            try:
                diff, lo, hi = paired_bootstrap_ci(arms[name], "correct_t2", ref, ref_key, args.n_boot, args.seed)
            except ValueError as err:
                raise SystemExit(f"--arm {name!r} against --reference {args.reference!r}: {err}") from err
            title = f"{name} Acc@t2 − {args.reference} {label}"
            lines.append(f"| {title} | {100 * diff:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
            pair = {"a": name, "key_a": "correct_t2", "b": args.reference, "key_b": ref_key}
            comparisons.append({**pair, "diff": diff, "lo": lo, "hi": hi})
    print("\n".join(lines))
    if args.json:
        out = {"n_boot": args.n_boot, "seed": args.seed, "arms": arm_stats, "comparisons": comparisons}
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
