"""scripts/replication_stats.py and scripts/audit_transitions.py on hand-made evaluation records (no model)."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest

from scripts import audit_transitions as audit
from scripts import replication_stats as stats

ROOT = Path(__file__).resolve().parents[2]


def pairs(spec: list[tuple[str, int, bool, bool]]) -> list[dict]:
    """Records from (problem_id, sample, correct_t1, correct_t2)."""
    return [{"problem_id": p, "sample": s, "correct_t1": t1, "correct_t2": t2} for p, s, t1, t2 in spec]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- McNemar -------------------------------------------------------------------------------------------------------


def test_mcnemar_matches_hand_computed_binomial():
    # 9 i→c, 1 c→i, plus concordant pairs that must not count: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    records = pairs([(f"q{i}", 0, False, True) for i in range(9)] + [("q9", 0, True, False)])
    records += pairs([("q10", 0, True, True), ("q11", 0, False, False)])
    result = stats.mcnemar_exact(records)
    assert (result["b"], result["c"], result["n"]) == (9, 1, 12)
    assert result["p"] == pytest.approx(0.021484375, abs=1e-12)
    assert result["p"] == pytest.approx(2 * (comb(10, 0) + comb(10, 1)) / 2**10, abs=1e-12)


def test_mcnemar_balanced_and_no_discordant_pairs():
    balanced = stats.mcnemar_exact(pairs([("a", 0, False, True), ("b", 0, True, False)] * 3))
    assert (balanced["b"], balanced["c"]) == (3, 3)
    assert 0.999 <= balanced["p"] <= 1.0
    none = stats.mcnemar_exact(pairs([("a", 0, True, True), ("b", 0, False, False)]))
    assert (none["b"], none["c"], none["p"]) == (0, 0, 1.0)


# -- paired bootstrap ----------------------------------------------------------------------------------------------


def test_bootstrap_identical_arms_give_zero():
    records = pairs([("a", 0, True, False), ("a", 1, False, True), ("b", 0, True, True), ("c", 0, False, False)])
    assert stats.paired_bootstrap_ci(records, "correct_t1", records, "correct_t1", n_boot=500) == (0.0, 0.0, 0.0)


def test_bootstrap_all_right_against_all_wrong():
    a = pairs([(f"q{i}", s, False, True) for i in range(5) for s in range(2)])
    b = pairs([(f"q{i}", s, False, False) for i in range(5) for s in range(2)])
    assert stats.paired_bootstrap_ci(a, "correct_t2", b, "correct_t2", n_boot=500) == (1.0, 1.0, 1.0)


def test_bootstrap_refuses_unpaired_problem_sets():
    a = pairs([("a", 0, True, True), ("b", 0, True, True)])
    b = pairs([("a", 0, True, True), ("c", 0, True, True)])
    with pytest.raises(ValueError, match="not paired"):
        stats.paired_bootstrap_ci(a, "correct_t2", b, "correct_t1")


def test_bootstrap_matches_a_slow_loop_on_four_problems():
    # Different sample counts per problem, so a per-pair mean would differ from the per-problem mean.
    a = pairs([("p1", 0, True, True), ("p1", 1, False, True), ("p2", 0, False, False)])
    a += pairs([("p3", 0, True, True), ("p3", 1, True, False), ("p3", 2, False, True), ("p4", 0, False, True)])
    b = pairs([("p1", 0, True, False), ("p2", 0, True, True), ("p2", 1, False, True), ("p3", 0, False, False)])
    b += pairs([("p4", 0, True, True)])
    n_boot, seed = 2000, 7
    diff, lo, hi = stats.paired_bootstrap_ci(a, "correct_t2", b, "correct_t1", n_boot=n_boot, seed=seed)

    ids = ["p1", "p2", "p3", "p4"]  # sorted, as the script orders problems
    # By hand: A's t2 per problem 1, 0, 2/3, 1; B's t1 per problem 1, 1/2, 0, 1.
    assert diff == pytest.approx(((1 - 1) + (0 - 0.5) + (2 / 3 - 0) + (1 - 1)) / 4)

    def mean_of(records: list[dict], key: str, pid: str) -> float:
        values = [r[key] for r in records if r["problem_id"] == pid]
        return sum(values) / len(values)

    # The same resample indices, drawn in one block; everything else a plain loop.
    draws = np.random.default_rng(seed).integers(0, 4, size=(n_boot, 4))
    slow = []
    for row in draws:
        picked = [ids[j] for j in row]
        slow.append(sum(mean_of(a, "correct_t2", p) - mean_of(b, "correct_t1", p) for p in picked) / len(picked))
    assert lo == pytest.approx(np.percentile(slow, 2.5))
    assert hi == pytest.approx(np.percentile(slow, 97.5))
    assert lo <= diff <= hi
    # Seeded: the same call gives the same interval.
    assert stats.paired_bootstrap_ci(a, "correct_t2", b, "correct_t1", n_boot=n_boot, seed=seed) == (diff, lo, hi)


# -- audit ---------------------------------------------------------------------------------------------------------

QUESTION = "Ann has 5 apples and 3 pears. She buys 4 more apples. How many apples does she have?"


def record(turn2: str, correct_t1: bool = True, correct_t2: bool = False, **extra) -> dict:
    base = {"problem_id": "q", "sample": 0, "question": QUESTION, "answer": "9", "turn1": "The answer is 9."}
    return {**base, "turn2": turn2, "correct_t1": correct_t1, "correct_t2": correct_t2, **extra}


def new(turn2: str, stated: str, source: str, finished: bool = True, t1: bool = True, t2: bool = False) -> dict:
    """A record with every key the current evaluation writes; ``stated`` is answer_t2, ``source`` answer_t2_from."""
    extra = {"answer_t1": "9", "turn2_scoring": "final", "finished_t1": True, "finished_t2": finished}
    return record(turn2, t1, t2, answer_t2=stated, answer_t2_from=source, **extra)


CASES = [
    (new("   \n", "9", "turn1"), "empty"),
    (new(" Let me recount: 5 + 3 + 4 = ", "9", "turn1", finished=False), "cut"),
    (new(" Yes, that is right.", "9", "turn1"), "affirmed"),
    # 5 + 3 = 8: the sum of a strict subset of the question's numbers (5, 3, 4), not the gold 9.
    (new(" 5 + 3 gives the answer is 8.", "8", "turn2"), "different_quantity"),
    # An old-style record (no answer_* or finished_* keys): the value is read from õ; 4 is a number of the question.
    (record(" She only bought 4, so the answer is 4."), "different_quantity"),
    (new(" The answer is 17.", "17", "turn2"), "different_value"),
    # An i→c case: the right value is never a "different quantity", even where it is a subset sum (5 + 4 = 9).
    (new(" The answer is 9.", "9", "turn2", t1=False, t2=True), "different_value"),
]


@pytest.mark.parametrize(("row", "category"), CASES)
def test_each_category(row, category):
    assert audit.categorize(row) == category


def test_old_record_without_an_answer_is_affirmed_and_unknown_finish_counts_as_finished():
    assert audit.categorize(record(" I agree with my reasoning above.")) == "affirmed"


def test_number_reading_and_subset_sums():
    assert audit.to_number("$1,200") == 1200
    assert audit.to_number("\\frac{3}{4}") == audit.to_number("3/4") == audit.to_number("0.75")
    assert audit.to_number("9 + 1 (unevaluated)") is None
    assert audit.question_numbers("It costs $1,200.50 for 3 days") == [audit.Fraction("1200.50"), 3]
    numbers = [audit.Fraction(x) for x in (5, 3, 4)]
    assert audit.is_subset_sum(audit.Fraction(8), numbers)
    assert not audit.is_subset_sum(audit.Fraction(12), numbers)  # all three: not a strict subset
    assert not audit.is_subset_sum(audit.Fraction(5), numbers)  # one number alone is not a sum
    assert not audit.is_subset_sum(audit.Fraction(8), numbers[:2])


# -- the command lines ---------------------------------------------------------------------------------------------


def arm_records(t1: list[bool], t2: list[bool]) -> list[dict]:
    """One sample per problem ``q<i>`` with the given correctness at each turn."""
    texts = [f" The answer is {9 if right else 8}." for right in t2]
    return [record(text, a, b, problem_id=f"q{i}") for i, (text, a, b) in enumerate(zip(texts, t1, t2))]


def test_replication_stats_cli(tmp_path, capsys):
    grpo = write_jsonl(tmp_path / "grpo.jsonl", arm_records([True, False, True, False], [True, False, False, False]))
    mgrpo = write_jsonl(tmp_path / "mgrpo.jsonl", arm_records([True, False, True, False], [True, True, True, True]))
    intrinsic = write_jsonl(tmp_path / "intr.jsonl", arm_records([False] * 4, [False] * 4))
    out = tmp_path / "stats.json"
    argv = [f"--arm=GRPO={grpo}", f"--arm=MGRPO={mgrpo}", f"--arm=Intrinsic={intrinsic}", "--n-boot=200"]
    assert stats.main([*argv, "--reference=GRPO", "--headline=MGRPO", f"--json={out}"]) == 0
    text = capsys.readouterr().out
    assert "| MGRPO | 4 | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 | 2 | 0 | 0.5 |" in text
    assert "| GRPO | 4 | 50.0 | 25.0 | -25.0 | 0.0 | 25.0 | 0 | 1 | 1 |" in text
    assert "MGRPO Acc@t2 − GRPO Acc@t2 | +75.0" in text
    assert "Intrinsic Acc@t2 − GRPO Acc@t1 | -50.0" in text
    saved = json.loads(out.read_text())
    assert saved["arms"]["MGRPO"]["mcnemar"] == {"b": 2, "c": 0, "n": 4, "p": 0.5}
    first = saved["comparisons"][0]
    assert (first["a"], first["key_a"], first["b"], first["key_b"]) == ("MGRPO", "correct_t2", "GRPO", "correct_t1")
    assert first["diff"] == pytest.approx(0.5) and first["lo"] <= first["diff"] <= first["hi"]
    assert len(saved["comparisons"]) == 4


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--arm=GRPO"], "--arm"),
        (["--arm=GRPO=/no/such.jsonl"], "--arm"),
        (["--arm=GRPO={a}", "--arm=GRPO={a}"], "--arm"),
        (["--arm=GRPO={a}", "--arm=MGRPO={a}", "--reference=Base"], "--reference"),
        (["--arm=GRPO={a}", "--arm=MGRPO={a}", "--headline=Nope"], "--headline"),
        (["--arm=GRPO={a}", "--arm=MGRPO={a}", "--headline=GRPO"], "--headline"),
        (["--arm=GRPO={a}", "--arm=MGRPO={unpaired}"], "--arm"),
    ],
)
def test_replication_stats_bad_flags_are_named(tmp_path, argv, flag):
    a = write_jsonl(tmp_path / "a.jsonl", arm_records([True, False], [True, True]))
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{**r, "problem_id": "other"} for r in arm_records([True], [True])])
    with pytest.raises(SystemExit) as err:
        stats.main([arg.format(a=a, unpaired=unpaired) for arg in argv])
    assert flag in str(err.value)


def test_audit_cli_end_to_end(tmp_path):
    rows = [row for row, _ in CASES]
    for i, row in enumerate(rows):
        row["problem_id"] = f"q{i}"
    rows.append(record(" The answer is 9.", True, True, problem_id="same"))  # no transition: not a case
    path = write_jsonl(tmp_path / "mgrpo.jsonl", rows)
    cases_path = tmp_path / "cases.jsonl"
    command = [sys.executable, "-m", "scripts.audit_transitions", f"MGRPO={path}", "--cases", str(cases_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| MGRPO | c→i | 1 | 1 | 1 | 2 | 1 | 6 |" in done.stdout
    assert "| MGRPO | i→c | 0 | 0 | 0 | 0 | 1 | 1 |" in done.stdout
    cases = [json.loads(line) for line in cases_path.read_text().splitlines()]
    assert [c["category"] for c in cases] == [category for _, category in CASES]
    assert cases[3]["stated_t2"] == "8" and cases[-1]["transition"] == "i→c"

    bad = subprocess.run([*command[:3], "MGRPO"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "arm 'MGRPO'" in bad.stderr
