"""Sort every i→c and c→i transition of evaluation records into what the correction õ (the ``turn2`` text) did.

    python -m scripts.audit_transitions GRPO=eval/GRPO/test_gsm8k_step0.jsonl MGRPO=eval/MGRPO/test_gsm8k_step0.jsonl
    python -m scripts.audit_transitions MGRPO=RESULTS.jsonl --cases cases.jsonl

A case takes the first category that fits, in this order (an earlier one explains the outcome more simply, so it
wins: a cut correction that states nothing is ``cut``, not ``affirmed``):

1. ``empty`` -- õ is blank after stripping white space.
2. ``cut`` -- õ was cut at the token limit (``finished_t2`` is False; records without it count as finished).
3. ``affirmed`` -- õ states no answer of its own: ``answer_t2_from`` is ``"turn1"``, or ``read_final_answer(õ)``
   finds none.
4. ``different_quantity`` -- the value õ states is not the gold answer but is a number of the question, or the sum
   of a strict subset of at least two of the question's numbers (an intermediate quantity, as in "5 apples and 3
   pears ... 8 fruit" when the question asks for something else). Numbers are the digit strings of the question
   (``1,200`` and ``3.5`` read whole; no words like "five", no signs); the subset sums use at most the first
   ``MAX_QUESTION_NUMBERS`` numbers. The gold is excluded because in word problems it is often such a sum itself,
   which would put most right corrections here.
5. ``different_value`` -- anything else: õ states another value (for an i→c case, the right one; an unevaluated
   expression, which cannot be compared as a number, lands here too).

The value õ states is the record's ``answer_t2`` when turn 2 was judged on õ's own answer (``answer_t2_from`` is
``"turn2"``), else ``read_final_answer(õ)`` (older records hold no ``answer_*`` keys).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from pathlib import Path

from mgrpo_pl.metrics.report import load_records
from mgrpo_pl.rewards import read_final_answer
from scripts import replication_stats

CATEGORIES = ("empty", "cut", "affirmed", "different_quantity", "different_value")
# Caps the subset-sum search at 2**16 (size, sum) states per case.
MAX_QUESTION_NUMBERS = 16
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
# Marks around a number that do not change its value: currency, percent, thousands separators, LaTeX spacing.
_NOISE = re.compile(r"\\[$%!,; ]|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|[$%,\s]|\^\{?\\circ\}?")


def to_number(text: object) -> Fraction | None:
    """A stated value as an exact number (``"$1,200"`` -> 1200, ``"\\frac{3}{4}"`` and ``"3/4"`` -> 3/4), or None."""
    if text is None:
        return None
    value = _NOISE.sub("", str(text).removesuffix(" (unevaluated)"))
    match = _FRAC.match(value)
    try:
        if match:
            sign = -1 if match.group(1) else 1
            return sign * Fraction(match.group(2)) / Fraction(match.group(3))
        return Fraction(value)  # also reads "3/4", "-2", "0.5"
    except (ValueError, ZeroDivisionError):
        return None


def question_numbers(question: str) -> list[Fraction]:
    """The numbers written with digits in ``question``, in order."""
    return [Fraction(m.group(0).replace(",", "")) for m in _NUMBER.finditer(question)]


def is_subset_sum(target: Fraction, numbers: list[Fraction]) -> bool:
    """Whether ``target`` is the sum of a strict subset of at least two of ``numbers``.

    A dynamic programme over (size, sum) pairs; the numbers are non-negative, so sums above the target are dropped.
    """
    numbers = numbers[:MAX_QUESTION_NUMBERS]
    if target < 0 or len(numbers) < 3:  # a strict subset of two needs three numbers
        return False
    reachable: set[tuple[int, Fraction]] = {(0, Fraction(0))}
    for x in numbers:
        reachable |= {(size + 1, s + x) for size, s in reachable if s + x <= target}
    return any(s == target and 2 <= size < len(numbers) for size, s in reachable)


def stated_value(record: dict) -> str | None:
    """The value õ states (see the module docstring), or None when it states none."""
    if record.get("answer_t2_from") == "turn2" and record.get("answer_t2") is not None:
        return str(record["answer_t2"])
    read = read_final_answer(str(record.get("turn2", "")))
    return None if read is None else read.text


def categorize(record: dict) -> str:
    """The first category of ``CATEGORIES`` that fits the record's correction (module docstring)."""
    correction = str(record.get("turn2", ""))
    if not correction.strip():
        return "empty"
    if record.get("finished_t2", True) is False:
        return "cut"
    if record.get("answer_t2_from") == "turn1" or read_final_answer(correction) is None:
        return "affirmed"
    value = to_number(stated_value(record))
    if value is not None and value != to_number(record.get("answer")):
        numbers = question_numbers(str(record.get("question", "")))
        if value in numbers or is_subset_sum(value, numbers):
            return "different_quantity"
    return "different_value"


def transition(record: dict) -> str | None:
    """``"i→c"``, ``"c→i"``, or None when both turns agree."""
    t1, t2 = bool(record["correct_t1"]), bool(record["correct_t2"])
    return None if t1 == t2 else ("i→c" if t2 else "c→i")


def audit(records: list[dict]) -> list[dict]:
    """One case per transition: problem, sample, direction, category and the value õ states."""
    cases = []
    for row in records:
        direction = transition(row)
        if direction is not None:
            cases.append(
                {
                    "problem_id": row.get("problem_id"),
                    "sample": row.get("sample", 0),
                    "transition": direction,
                    "category": categorize(row),
                    "answer": row.get("answer"),
                    "stated_t2": stated_value(row),
                }
            )
    return cases


def parse_arm(spec: str) -> tuple[str, Path]:
    """``NAME=PATH.jsonl`` -> (name, path), as the statistics script reads its arms; the error names the argument."""
    return replication_stats.parse_arm(spec, flag="arm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="+", metavar="NAME=PATH.jsonl", help="per-problem JSONL of each arm")
    parser.add_argument("--cases", type=Path, help="also write one JSON line per transition here")
    args = parser.parse_args(argv)
    arms = [parse_arm(spec) for spec in args.arms]
    lines = [
        "| Arm | Transition | " + " | ".join(CATEGORIES) + " | total |",
        "|" + "---|" * (len(CATEGORIES) + 3),
    ]
    all_cases = []
    for name, path in arms:
        try:
            cases = audit(load_records(path))
        except (ValueError, json.JSONDecodeError) as err:
            raise SystemExit(f"arm {name}={path}: {err}") from err
        for direction in ("i→c", "c→i"):
            counts = [sum(c["transition"] == direction and c["category"] == cat for c in cases) for cat in CATEGORIES]
            lines.append(f"| {name} | {direction} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
        all_cases += [{"arm": name, **case} for case in cases]
    print("\n".join(lines))
    if args.cases:
        args.cases.write_text("".join(json.dumps(case, ensure_ascii=False) + "\n" for case in all_cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
