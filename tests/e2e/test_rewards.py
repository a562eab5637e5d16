"""MathReward against real math-verify in real worker processes.

The table's expected values were checked one by one against math-verify 0.9.0 (``verify(parse("$gold$"),
parse(completion))``): it documents what the reward really does, including the surprising rows (``1e3`` reads as
``1*e*3``, two different boxes become a set, ``\\$5.`` outside a box parses to nothing, ``5\\%`` matches 5).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from mgrpo_pl.rewards import MathReward, RewardFunction

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.0
# A call with one item may wait for a replacement worker (killed in an earlier test) to import and warm up.
MARGIN_S = 4.0

GSM8K_NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
GSM8K_EARNINGS = "She earns 5*200 = <<5*200=1000>>1000 dollars.\n#### 1,000"
MATH_RATIO = "We compute the ratio of the areas. It equals $\\boxed{\\frac{3}{4}}$."

# (completion, gold, expected reward)
TABLE = [
    # integers, negatives, wrong answers
    ("So the answer is \\boxed{72}.", "72", 1.0),
    ("So the answer is \\boxed{71}.", "72", 0.0),
    ("The answer is 72.", "72", 1.0),  # no box: the last expression is used
    ("Final answer: \\boxed{-3}", "-3", 1.0),
    ("Final answer: \\boxed{3}", "-3", 0.0),
    ("\\boxed{-72}", "72", 0.0),
    ("\\boxed{72.0}", "72", 1.0),
    # decimals and fractions
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{7/2}", "3\\frac{1}{2}", 1.0),  # mixed number
    ("\\boxed{3.50}", "3.5", 1.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),  # compared at 6 decimals
    ("\\boxed{0.3333333}", "\\frac{1}{3}", 1.0),
    # thousands separators
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("The total is $1,000.", "1000", 1.0),
    # units, currency, percent, degrees
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5}", "5 cm", 1.0),
    ("\\boxed{\\$5}", "5", 1.0),
    ("It costs \\$5.", "5", 1.0),  # a price's escaped dollar sign is not part of the value
    ("\\boxed{5\\%}", "5", 1.0),  # percent matches both 5 and 0.05
    ("\\boxed{0.05}", "5\\%", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    # expressions, sqrt, pi, powers
    ("\\boxed{x^2+1}", "1+x^2", 1.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{x^2-1}", "x^2+1", 0.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{1.414}", "\\sqrt{2}", 0.0),
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{6.28}", "2\\pi", 0.0),
    ("\\boxed{10^3}", "1000", 1.0),
    ("\\boxed{1e3}", "1000", 0.0),  # e is Euler's number: 1*e*3
    ("\\boxed{x=5}", "5", 1.0),  # the right-hand side of an equation counts
    # sets, intervals, tuples, matrices
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", 0.0),
    ("\\boxed{[1,2)}", "[1,2)", 1.0),
    ("\\boxed{(1,2)}", "[1,2)", 0.0),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1.0),
    ("\\boxed{x \\le 3}", "(-\\infty,3]", 0.0),  # an inequality is not an interval
    ("\\boxed{(1,2,3)}", "(1,2,3)", 1.0),
    ("\\boxed{(3,2,1)}", "(1,2,3)", 0.0),  # tuples are ordered
    ("\\boxed{3, 2, 1}", "1,2,3", 1.0),  # a bare list is a set
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0),
    # multiple choice
    ("\\boxed{B}", "\\text{(B)}", 1.0),
    ("\\boxed{C}", "\\text{(B)}", 0.0),
    # no answer at all; two different boxes
    ("I don't know.", "72", 0.0),
    ("", "72", 0.0),
    ("First \\boxed{72}, but wait, it is \\boxed{73}.", "72", 0.0),  # the last box is the answer: 73
    ("First \\boxed{72}, but wait, it is \\boxed{73}.", "73", 1.0),
    # which text is the final answer (rewards/reading.py): a value, not a restated expression
    ("So, the final answer is 9 + 1 = 2.", "10", 0.0),  # the last right-hand side, 2, is the answer
    ("So, the final answer is 9 + 1 = 2.", "2", 1.0),
    ("The sum is 0 + 9.", "9", 0.0),  # unevaluated arithmetic outside a box is no answer
    ("We have 4 \\times 3.", "12", 0.0),
    ("\\boxed{4 \\times 3}", "12", 1.0),  # inside a box the expression is the answer and math-verify evaluates it
    ("There are actually 8, not 1.", "8", 1.0),  # a negated number is not the answer
    ("There are actually 8, not 1.", "1", 0.0),
    ("1. Add the numbers.\n2. We get 7 + 6 = 13", "13", 1.0),  # list indices are skipped
    # GSM8K golds
    ("So she sold 48 + 24 = 72 clips in total. The answer is \\boxed{72}.", GSM8K_NATALIA, 1.0),
    ("She earns \\boxed{1000} dollars.", GSM8K_EARNINGS, 1.0),
    ("She earns \\boxed{100} dollars.", GSM8K_EARNINGS, 0.0),
    # MATH solution golds
    ("so \\boxed{\\frac{3}{4}}", MATH_RATIO, 1.0),
    ("so \\boxed{\\frac{4}{3}}", MATH_RATIO, 0.0),
    ("\\boxed{5}", "#### Step 1\nAdd them: $2+3=\\boxed{5}$.", 1.0),  # a heading's #### does not beat the box
]

# (id, completion, gold, timeouts expected in that call or None when the outcome depends on machine speed)
ADVERSARIAL = [
    ("factorial", "\\boxed{(2^{100000}+1)!}", "1", None),  # its parse takes 0.97-1.1 s here: at the 1-s limit
    ("power_tower", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "1", 1),
    ("huge_power", "\\boxed{9^{9^{9}}}", "1", 1),
    ("million_chars", "1 " * 500_000, "2", 0),  # read as its last number, 1, in ~0.4 s: no time limit is reached
    ("nested_braces", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1", 1),
    ("malformed", "\\boxed{\\frac{1}{", "1", 0),
    ("huge_unequal", "\\boxed{10^{10^{8}}}", "10^{10^{8}}+1", None),
]


@pytest.fixture(scope="module")
def reward():
    """Short timeout: the adversarial inputs must be cut off quickly."""
    with MathReward(timeout_s=TIMEOUT_S, num_workers=2) as shared:
        yield shared


@pytest.fixture(scope="module")
def patient_reward():
    """Real answers must score the same on a loaded machine: symbolic checks like (x+1)^2 = x^2+2x+1 can take over
    a second when other jobs share the cores, so the table gets a timeout no real answer comes near."""
    with MathReward(timeout_s=15.0, num_workers=2) as shared:
        yield shared


def test_table(patient_reward):
    reward = patient_reward
    assert len(TABLE) >= 30
    scores = reward([c for c, _, _ in TABLE], [g for _, g, _ in TABLE])
    assert scores.dtype == torch.float32 and scores.shape == (len(TABLE),)
    wrong = [
        (completion, gold, expected, got)
        for (completion, gold, expected), got in zip(TABLE, scores.tolist(), strict=True)
        if got != expected
    ]
    assert wrong == []
    assert reward.stats()["last_call_timeouts"] == 0


def test_gold_formats(patient_reward):
    reward = patient_reward
    golds = ["72", "#### 72", GSM8K_NATALIA, "The total is $\\boxed{72}$.", "$72$", " 72 \n"]
    assert reward(["The answer is \\boxed{72}."] * len(golds), golds).tolist() == [1.0] * len(golds)
    latex_golds = ["\\frac{3}{4}", "3/4", "0.75", MATH_RATIO, "$\\frac{3}{4}$"]
    got = reward(["so \\boxed{\\frac{3}{4}}"] * len(latex_golds), latex_golds)
    assert got.tolist() == [1.0] * len(latex_golds)


def test_unparseable_gold_is_counted(reward):
    before = reward.stats()["gold_unparsed"]
    assert reward(["\\boxed{1}", "\\boxed{1}"], ["", "\\text{}"]).tolist() == [0.0, 0.0]
    assert reward.stats()["gold_unparsed"] == before + 2


@pytest.mark.parametrize(
    ("completion", "gold", "timeouts"), [a[1:] for a in ADVERSARIAL], ids=[a[0] for a in ADVERSARIAL]
)
def test_adversarial_returns_in_time(reward, completion, gold, timeouts):
    before = reward.stats()
    start = time.monotonic()
    score = reward([completion], [gold])
    elapsed = time.monotonic() - start
    after = reward.stats()
    assert score.tolist() == [0.0]
    assert elapsed < TIMEOUT_S + MARGIN_S
    if timeouts is not None:
        assert after["last_call_timeouts"] == timeouts
        assert after["timeouts"] == before["timeouts"] + timeouts
    assert after["scored"] == before["scored"] + 1
    # The pool survives whatever happened: the next call scores normally.
    assert reward(["\\boxed{4}"], ["4"]).tolist() == [1.0]


def test_adversarial_batch_keeps_good_items(reward):
    completions = ["\\boxed{(2^{100000}+1)!}", "\\boxed{72}", "\\boxed{9^{9^{9}}}", "\\boxed{\\frac{1}{2}}"]
    answers = ["1", "#### 72", "1", "0.5"]
    start = time.monotonic()
    assert reward(completions, answers).tolist() == [0.0, 1.0, 0.0, 1.0]
    # Two workers: the slow items take at most two rounds (one if both workers are up, as usual).
    assert time.monotonic() - start < 2 * TIMEOUT_S + MARGIN_S
    # The power tower always hits the limit; the factorial's parse takes 0.97-1.1 s on this CPU, right at the 1-s limit,
    # so whether it is cut depends on the machine (its score is 0 either way).
    assert reward.stats()["last_call_timeouts"] in (1, 2)


def test_hard_timeout_kills_and_replaces_the_worker():
    # Below 1 s the hard limit is shorter than math-verify's own whole-second alarm, so only the kill can end it.
    with MathReward(timeout_s=0.5, num_workers=1) as quick:
        assert quick.soft_timeout_s == 1
        quick.start()  # returns at once; the worker starts in the background
        assert quick(["\\boxed{72}"], ["72"]).tolist() == [1.0]
        start = time.monotonic()
        assert quick(["\\boxed{(2^{100000}+1)!}"], ["1"]).tolist() == [0.0]
        assert time.monotonic() - start < 0.5 + MARGIN_S
        assert quick.stats()["killed"] == 1 and quick.stats()["timeouts"] == 1
        # The only worker was killed; the replacement scores the next call.
        assert quick(["\\boxed{72}", "\\boxed{7}"], ["72", "72"]).tolist() == [1.0, 0.0]
        assert quick.stats() == {
            "scored": 4,
            "timeouts": 1,
            "killed": 1,
            "errors": 0,
            "gold_unparsed": 0,
            "last_call_timeouts": 0,
        }


def test_length_mismatch_names_both_lengths(reward):
    with pytest.raises(ValueError, match="3 completions and 2 answers"):
        reward(["a", "b", "c"], ["1", "2"])


def test_empty_input(reward):
    before = reward.stats()["scored"]
    out = reward([], [])
    assert out.shape == (0,) and out.dtype == torch.float32
    assert reward.stats()["scored"] == before


def test_works_from_a_non_main_thread(reward):
    # In-process math-verify raises ValueError off the main thread (signal.alarm); the workers make this work.
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def score() -> None:
        try:
            results.append(reward(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "4"]))
        except BaseException as error:  # reported to the main thread below
            errors.append(error)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert errors == []
    assert results[0].tolist() == [1.0, 0.0]


def test_reward_function_protocol():
    def plain(completions: list[str], answers: list[str]) -> torch.Tensor:
        return torch.zeros(len(completions))

    assert isinstance(MathReward(), RewardFunction)  # no pool starts until the first call
    assert isinstance(plain, RewardFunction)
    assert not isinstance(42, RewardFunction)
