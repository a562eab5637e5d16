"""Which text is a completion's final answer (``mgrpo_pl/rewards/reading.py``), rule by rule.

Most texts are real: the issue's quoted cases, and completions of SmolLM2-135M-Instruct taken verbatim from the
committed per-problem records in ``docs/replication/eval/`` (problem id in the comment). The expected answers were
read off by hand.
"""

from __future__ import annotations

import time

import pytest

from mgrpo_pl.rewards.reading import FinalAnswer, read_final_answer

V = "value"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the cases
        ("So, the final answer is 9 + 1 = 2.", FinalAnswer("2", "phrase")),  # last right-hand side
        ("7 + 6 = 13", FinalAnswer("13", "number")),
        ("The sum is 0 + 9.", FinalAnswer("0 + 9", "number", unevaluated=True)),
        ("We have 4 \\times 3", FinalAnswer("4 \\times 3", "number", unevaluated=True)),
        ("There are actually 8, not 1.", FinalAnswer("8", "number")),  # a negation is not the answer
        ("The answer is 8 (not 1).", FinalAnswer("8", "phrase")),
        # a box wins within one text, and the last box of several
        ("The answer is \\boxed{5}. Wait, let me double-check. The answer is 7.", FinalAnswer("5", "boxed")),
        ("First \\boxed{72}, but wait, it is \\boxed{73}.", FinalAnswer("73", "boxed")),
        ("\\boxed{4 \\times 3}", FinalAnswer("4 \\times 3", "boxed")),  # inside a box: judged by math-verify
        # values in other shapes
        ("The answer is $\\frac{3}{4}$.", FinalAnswer("\\frac{3}{4}", "phrase")),
        ("so x = \\frac{3}{4}", FinalAnswer("\\frac{3}{4}", "number")),
        ("We get $2+3=5$ apples", FinalAnswer("5", "number")),
        ("The answer is 1,000.", FinalAnswer("1,000", "phrase")),
        ("I think 3.5 is right.", FinalAnswer("3.5", "number")),
        ("x = -3", FinalAnswer("-3", "number")),
        ("The answer is -5.", FinalAnswer("-5", "phrase")),
        ("**Answer:** 18", FinalAnswer("18", "phrase")),
        ("It costs \\$5.", FinalAnswer("5", "number")),
        # no answer stated
        ("The answer is indeed the same as before.", None),
        ("So, the answer is \\boxed{}.", None),
        ("The answer is 3. So \\boxed{\\frac{1}{", FinalAnswer("3", "phrase")),  # an unclosed box is no answer
        ("I don't know.", None),
        ("", None),
        # real completions (docs/replication/eval/MGRPO)
        (  # add-0-0 turn 2: a stray "0" earlier, the stated answer is 1
            " So, we need to find the fractional part of 0.\n\nIn this case, we can replace 0 with any number (0) to "
            "find the fractional part of 0. So, the answer is 1.",
            FinalAnswer("1", "phrase"),
        ),
        (  # add-0-1 turn 1: the problem restated, never answered
            "1 + 1 = 2 in the context of mathematics and logic\n\nSo there's only 1 logical answer to the problem of "
            "0 + 1.",
            FinalAnswer("0 + 1", "number", unevaluated=True),
        ),
        (  # add-0-3 turn 1: "The answer is:" at the very end
            "1. Add 3 to 0, which is 3.\n2. Now 3 + 0 = 3.\n\nThe answer is: 3",
            FinalAnswer("3", "phrase"),
        ),
        (  # add-0-3 turn 2: an "Answer:" line after a wrong argument
            "\n\nIn particular, consider 0 + 3. If we add 0 + 3, we get 0, which is a positive number.\n\nSo, adding 0 "
            "to any number results in itself. Therefore, there is only one way to add 0 to any number.\n\nAnswer: 1",
            FinalAnswer("1", "phrase"),
        ),
        (  # add-0-8 turn 1: the final statement restates the sum and then evaluates it
            "To think step-by-step: \n\n1. 0 + 8 equals 8.\n2. 8 - 0 equals 8.\n\nSo, the final answer is 0 + 8 = 8.",
            FinalAnswer("8", "phrase"),
        ),
        (  # add-0-2 turn 1: the answer phrase wins over the numbered list after it
            "1. First, calculate 2 - 2: 2 is 2, so 1 - 1 is 0.\n2. Then, multiply 2 by 1: 2 * 2 = 4.\n\nSo, the answer "
            "is 4. If you want a step-by-step explanation, you can use the following code:\n\n1. This is a "
            "step-by-step explanation, so use a code like this:",
            FinalAnswer("4", "phrase"),
        ),
        ("1. Add the numbers.\n2. ", None),  # list indices are not answers
        (" re-explain it, but it is off-topic for the provided task.", None),  # add-0-6 turn 2
    ],
)
def test_value_reading(text, expected):
    assert read_final_answer(text, V) == expected


@pytest.mark.parametrize(
    ("text", "answer_format", "expected"),
    [
        ("The answer is 7.", "boxed", None),  # strict: no box, no answer
        ("so \\boxed{7}. Then 8.", "boxed", FinalAnswer("7", "boxed")),
        ("Answer: 18", "answer_line", FinalAnswer("18", "line")),
        ("Answer: 12\nWait, let me double-check.\nAnswer: 13", "answer_line", FinalAnswer("13", "line")),
        ("Answer: 9 + 1", "answer_line", FinalAnswer("9 + 1", "line", unevaluated=True)),
        ("The answer is 18.", "answer_line", None),  # not on its own "Answer:" line
        ("\\boxed{18}", "answer_line", None),
        ("anything 5", "math_verify", FinalAnswer("anything 5", "math_verify")),
        ("   ", "math_verify", None),
    ],
)
def test_strict_formats(text, answer_format, expected):
    assert read_final_answer(text, answer_format) == expected


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="answer_format must be one of value, boxed, answer_line, math_verify"):
        read_final_answer("5", "last_number")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "1 + " * 100_000,  # one regex with nested repetition backtracks exponentially on this
        "answer: " + "1 + " * 100_000,
        "answer is " * 100_000,
        "1 " * 500_000,
        "$" * 200_000,
        "(" * 500_000,
    ],
    ids=["long_sum", "long_stated_sum", "many_phrases", "many_numbers", "dollars", "parens"],
)
def test_hostile_text_reads_in_linear_time(text):
    # The reading runs in the training process: it must not hang on any text. CPU time, not wall-clock, so a busy
    # machine does not move it; the cases take 0.03-0.4 s here and an exponential regex would take hours.
    start = time.process_time()
    read_final_answer(text, V)
    assert time.process_time() - start < 20
