"""What runs inside a ``MathReward`` worker process: math-verify on one (completion, gold answer) pair.

This module must not import torch (directly or through its imports): the workers import it to unpickle the task
function, and a torch import costs each worker ~3 s at start and after every kill.
"""

from __future__ import annotations

import logging
import re

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from mgrpo_pl.rewards.answers import normalize_gold
from mgrpo_pl.rewards.reading import FinalAnswer, read_final_answer

OK, TIMEOUT, KILLED, ERROR, NO_GOLD = "ok", "timeout", "killed", "error", "no_gold"

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# Parsed once in each new worker so grammar and regex compilation happen outside any task's time limit.
WARMUP = (
    ("so the answer is \\boxed{72}", "#### 72"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{(1, 2]}", "(1,2]"),
    ("The answer is $x^2+1$.", "\\boxed{1+x^2}"),
)


class _MathVerifyLogCounter(logging.Handler):
    """Counts the timeouts and errors math-verify swallows (it logs them and returns False / [] instead of raising).

    Counting by message text only affects the statistics, never a score: if a math-verify release rewords its log
    lines, ``stats()`` under-counts soft timeouts and the tests that watch them fail loudly.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.timeouts = 0
        self.errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith("Timeout during"):
            self.timeouts += 1
        elif message.startswith("Error"):
            self.errors += 1


_LOG_COUNTER = _MathVerifyLogCounter()


def init_worker() -> None:
    """Route math-verify's logging into the counter and warm the parser up. Runs once in each new worker."""
    mv_logger = logging.getLogger("math_verify")
    # propagate=False also keeps a 10^6-character input that timed out from being echoed into the training log.
    mv_logger.handlers[:] = [_LOG_COUNTER]
    mv_logger.setLevel(logging.DEBUG)
    mv_logger.propagate = False
    for completion, answer in WARMUP:
        score_item(completion, answer, 5, "value")


def _gold_for_math_verify(answer: str) -> str:
    """Normalise a gold answer and put it in math delimiters unless it already has some."""
    gold = normalize_gold(answer)
    if _UNESCAPED_DOLLAR.search(gold) or "\\(" in gold or "\\[" in gold:
        return gold
    return f"${gold}$"


def _prediction_text(reading: FinalAnswer) -> str:
    """The read answer as math-verify is given it: a box stays a box (its sets, units and lists rules), the rest is
    put in math delimiters, the whole text for the ``math_verify`` reading."""
    if reading.source == "math_verify":
        return reading.text
    if reading.source == "boxed":
        return f"\\boxed{{{reading.text}}}"
    return f"${reading.text}$"


def score_item(completion: str, answer: str, soft_timeout_s: int, answer_format: str) -> tuple[float, str]:
    """Score one completion in a worker. Returns ``(score, outcome)``, outcome one of ok/timeout/error/no_gold."""
    timeouts_before, errors_before = _LOG_COUNTER.timeouts, _LOG_COUNTER.errors
    correct = False
    gold_ok = True
    try:
        gold = parse(_gold_for_math_verify(answer), parsing_timeout=soft_timeout_s)
        gold_ok = bool(gold)
        reading = read_final_answer(completion, answer_format) if gold_ok else None  # type: ignore[arg-type]
        if reading is not None and not reading.unevaluated:
            prediction = parse(_prediction_text(reading), parsing_timeout=soft_timeout_s)
            correct = bool(prediction) and bool(verify(gold, prediction, timeout_seconds=soft_timeout_s))
    except TimeoutException:
        # The alarm can fire just outside math-verify's own handlers.
        return 0.0, TIMEOUT
    except Exception:
        return 0.0, ERROR
    if _LOG_COUNTER.timeouts > timeouts_before:
        outcome = TIMEOUT
    elif _LOG_COUNTER.errors > errors_before:
        outcome = ERROR
    elif not gold_ok:
        outcome = NO_GOLD
    else:
        outcome = OK
    return (1.0 if correct else 0.0), outcome
