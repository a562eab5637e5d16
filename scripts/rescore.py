"""Score evaluation records again under other readings of the final answer, side by side.

Each per-problem JSONL row that ``mgrpo test`` writes holds both turns' texts; this scores them again as the
reward and the turn-2 rule of each ``--reading`` would, and prints the Table-2 rows per reading, with how many
transitions each reading counts. Nothing is generated, so two readings are compared on the very same samples.

    python -m scripts.rescore docs/replication/eval/MGRPO/test_add_1digit_step0.jsonl
    python -m scripts.rescore RESULTS.jsonl --reading "old=math_verify:correction" --reading "new=value:final"

A reading is ``NAME=ANSWER_FORMAT:TURN2_SCORING`` (``mgrpo_pl/rewards/reading.py``, ``RolloutConfig.turn2_scoring``);
the default pair is the reading before the final-answer rules (math-verify's extraction, turn 2 scored on the
correction alone) and the current default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mgrpo_pl.algo.correction import TURN2_SCORINGS, turn2_texts
from mgrpo_pl.metrics.report import COLUMNS, load_records, markdown_table, summarize
from mgrpo_pl.rewards import ANSWER_FORMATS, MathReward

DEFAULT_READINGS = ("old=math_verify:correction", "new=value:final")


def parse_reading(spec: str) -> tuple[str, str, str]:
    """``NAME=ANSWER_FORMAT:TURN2_SCORING`` -> (name, answer_format, turn2_scoring); the error names the flag."""
    name, _, rest = spec.partition("=")
    answer_format, _, mode = rest.partition(":")
    if not name or answer_format not in ANSWER_FORMATS or mode not in TURN2_SCORINGS:
        raise SystemExit(
            f"--reading {spec!r}: expected NAME=ANSWER_FORMAT:TURN2_SCORING with ANSWER_FORMAT one of "
            f"{', '.join(ANSWER_FORMATS)} and TURN2_SCORING one of {', '.join(TURN2_SCORINGS)}"
        )
    return name, answer_format, mode


def rescore(records: list[dict], answer_format: str, mode: str, reward: MathReward | None = None) -> list[dict]:
    """The records with ``correct_t1`` / ``correct_t2`` (and the answer read for turn 2's source) scored again."""
    reward = reward or MathReward(answer_format=answer_format)  # type: ignore[arg-type]
    reward.answer_format = answer_format
    for key in ("turn1", "turn2", "answer"):
        missing = [i for i, r in enumerate(records) if key not in r]
        if missing:
            raise SystemExit(f"record {missing[0]} has no {key!r}: rescoring needs the texts `mgrpo test` writes")
    first = [str(r["turn1"]) for r in records]
    answers = [str(r["answer"]) for r in records]
    scored, kept = turn2_texts(
        first,
        [str(r.get("guide", "")) for r in records],
        [str(r["turn2"]) for r in records],
        mode,
        lambda text: reward.final_answer(text) is not None,
    )
    r1 = reward(first, answers)
    r2 = reward(scored, answers)
    return [
        {**row, "correct_t1": bool(a >= 1.0), "correct_t2": bool(b >= 1.0), "answer_t2_from": "turn1" if k else "turn2"}
        for row, a, b, k in zip(records, r1.tolist(), r2.tolist(), kept)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", type=Path, help="per-problem JSONL files written by `mgrpo test`")
    parser.add_argument("--reading", action="append", help="NAME=ANSWER_FORMAT:TURN2_SCORING (repeatable)")
    parser.add_argument("--json", type=Path, help="also write every reading's summary here")
    args = parser.parse_args(argv)
    readings = [parse_reading(spec) for spec in (args.reading or DEFAULT_READINGS)]
    rows, summaries = [], {}
    with MathReward() as reward:
        for path in args.records:
            if not path.is_file():
                raise SystemExit(f"records: {path} is not a file")
            records = load_records(path)
            for name, answer_format, mode in readings:
                scored = rescore(records, answer_format, mode, reward)
                summary = summarize(scored)
                summary["kept_turn1"] = sum(r["answer_t2_from"] == "turn1" for r in scored) / len(scored)
                rows.append((path.stem, f"{name} ({answer_format}, {mode})", summary))
                summaries[f"{path}:{name}"] = summary
    print(markdown_table(rows))
    print()
    print("| records | reading | turn 2 kept turn 1's answer |")
    print("|---|---|---|")
    for bench, reading, summary in rows:
        print(f"| {bench} | {reading} | {100 * summary['kept_turn1']:.1f} |")
    if args.json:
        keys = [k for k, _ in COLUMNS] + ["kept_turn1", "n", "samples"]
        args.json.write_text(json.dumps({k: {c: v[c] for c in keys} for k, v in summaries.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
