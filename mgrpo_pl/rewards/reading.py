"""Which text of a completion is its final answer.

math-verify judges whether two answers are equal; it does not reliably pick which text a completion ends on. Its
own extraction reads ``"So, the final answer is 9 + 1 = 2."`` as ``9 + 1`` (its anchor stops at ``=``), which equals
10; ``"There are actually 8, not 1."`` as 1; and lets an earlier ``\\boxed{5}`` outrank a later ``the answer is 7``.
A reward built on that pays for restated expressions, and a policy can learn to write them. So the reading is ours:
``read_final_answer(text, answer_format)`` returns the final answer's text, and math-verify judges only that text.

``answer_format`` names the rules:

* ``value`` (the default) -- a final answer is a value:

  1. the content of the last ``\\boxed{}`` (or ``\\fbox{}``), when there is one;
  2. else the value after the last answer phrase (``the answer is``, ``final answer:``, ``Answer:``, ...), up to the
     end of its sentence;
  3. else the last number of the text, skipping a negated one (``8, not 1`` answers 8) and a list index (``1.`` or
     ``2)`` opening a line);

  and, for 2 and 3, in an equation chain the last right-hand side (``9 + 1 = 2`` answers 2, ``7 + 6 = 13`` answers
  13), a number inside ``$...$`` reads as that whole math span. An arithmetic expression of numbers left unevaluated
  outside a box (``0 + 9``, ``4 \\times 3``) is read, so that it counts as a stated answer, but marked
  ``unevaluated``: it is not an answer and scores 0.
* ``boxed`` -- only the last ``\\boxed{}``; a completion without one has no answer.
* ``answer_line`` -- only the last line of the form ``Answer: <value>``, read as rule 2 reads a statement.
* ``math_verify`` -- math-verify's own extraction over the whole text (the reading before these rules; kept for
  comparison).

Everything here is a linear scan (no regex with nested repetition), so the training process may call it on any text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mgrpo_pl.rewards.answers import last_boxed_content

AnswerFormat = Literal["value", "boxed", "answer_line", "math_verify"]
ANSWER_FORMATS: tuple[str, ...] = ("value", "boxed", "answer_line", "math_verify")

__all__ = ["ANSWER_FORMATS", "AnswerFormat", "FinalAnswer", "check_answer_format", "read_final_answer"]


@dataclass(frozen=True)
class FinalAnswer:
    """A completion's final answer as read.

    Attributes:
        text: The answer's text, without math delimiters (for ``math_verify``: the whole completion).
        source: Which rule found it: ``boxed``, ``phrase``, ``line``, ``number`` or ``math_verify``.
        unevaluated: An arithmetic expression of numbers outside a box (``9 + 1``): stated, but not an answer.
    """

    text: str
    source: str
    unevaluated: bool = False


# An answer phrase: "answer" and a linking word or mark ("the final answer is", "Answer:", "my answer would be").
# The link keeps "answer the question" and "the answer choices" out.
_PHRASE = re.compile(
    r"\banswer\s*(?::|=|(?:is|was|would be|should be|will be|must be|remains|stays|equals)\b)", re.IGNORECASE
)
_ANSWER_LINE = re.compile(r"^[ \t*#>_-]*answer[ \t*_]*:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+")
# A negation right before a number: "not 1", "isn't 1", "instead of 1", "rather than 1".
_NEGATION = re.compile(r"(?:\bnot|n't|\binstead of|\brather than)\s*\$?\s*-?$", re.IGNORECASE)
# "8, not 1" and "8 (not 1)": the negated alternative is not part of the answer.
_NEGATED_TAIL = re.compile(r",?\s*\(?\s*(?:not|rather than|instead of)\b", re.IGNORECASE)
# A list index or step number: "1." / "2)" opening a line, or "Step 3".
_LIST_INDEX = re.compile(r"(?:^|\n)[ \t]*(?:[-*][ \t]*)?$")
_STEP = re.compile(r"\bstep\s*$", re.IGNORECASE)
# Tokens of arithmetic on numbers. Expressions are checked token by token, never by one regex with nested repetition
# (on "1 + 1 + ... +" such a regex backtracks exponentially).
_OPERATOR = r"[+\-*×÷x·]|\\times|\\cdot|\\div"
_ARITH_TOKEN = re.compile(
    rf"(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)|(?P<op>{_OPERATOR})|(?P<skip>[\s()])|(?P<other>.)", re.DOTALL
)
# The leading value of a statement: numbers, operators, fractions and the marks between them; no words.
_LEADING_VALUE = re.compile(r"[-+]?\s*(?:\\\$|\$)?\s*(?:\\[a-zA-Z]+|[\d.,+\-*/×÷^(){}\[\]=% ·]|\\ |\\!|\\,)+")
_FRACTION = re.compile(r"-?\\[dt]?frac\{[^{}]{1,40}\}\{[^{}]{1,40}\}")
_MATH_SPANS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


def read_final_answer(text: str, answer_format: AnswerFormat = "value") -> FinalAnswer | None:
    """The final answer of ``text`` under the rules ``answer_format`` names (see the module docstring).

    Returns:
        The answer, or None when the text states none under those rules.

    Raises:
        ValueError: For an unknown ``answer_format``.
    """
    check_answer_format(answer_format)
    if answer_format == "value":
        return _read_value(text)
    if answer_format == "boxed":
        boxed = last_boxed_content(text)
        return FinalAnswer(boxed.strip(), "boxed") if boxed is not None and boxed.strip() else None
    if answer_format == "answer_line":
        lines = list(_ANSWER_LINE.finditer(text))
        return _statement_value(lines[-1].group(1), "line") if lines else None
    return FinalAnswer(text, "math_verify") if text.strip() else None


def check_answer_format(answer_format: str) -> AnswerFormat:
    """``answer_format`` itself when it names a reading; else ``ValueError`` listing the names."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    return answer_format  # type: ignore[return-value]


def _read_value(text: str) -> FinalAnswer | None:
    boxed = last_boxed_content(text)
    if boxed is not None and boxed.strip():
        return FinalAnswer(boxed.strip(), "boxed")
    if boxed is None and ("\\boxed" in text or "\\fbox" in text):
        # An unclosed box (a truncated answer, "\\boxed{\\frac{1}{"): its digits are no answer, so only the text
        # before it is read.
        text = text[: max(text.rfind("\\boxed"), text.rfind("\\fbox"))]
    phrases = list(_PHRASE.finditer(text))
    if phrases:
        stated = _statement_value(_sentence(text, phrases[-1].end()), "phrase")
        if stated is not None:
            return stated
    return _last_number(text)


def _sentence(text: str, start: int) -> str:
    """The text from ``start`` to the end of its sentence: a line break, or ``.``/``!``/``?`` not inside a number."""
    newline = text.find("\n", start)
    end = len(text) if newline < 0 else newline
    for i in range(start, end):
        # "3.5" keeps its point: a sentence's period is followed by white space or nothing.
        if text[i] in "!?" or (text[i] == "." and (i + 1 == len(text) or text[i + 1].isspace())):
            return text[start:i]
    return text[start:end]


def _statement_value(statement: str, source: str) -> FinalAnswer | None:
    """The value a statement opens with (``13``, ``$\\frac{3}{4}$``, ``9 + 1 = 2``); None when it opens with words."""
    body = _NEGATED_TAIL.split(statement.strip().lstrip(":").strip(), maxsplit=1)[0]
    span = _leading_math_span(body)
    if span is not None:
        value = span
    else:
        match = _LEADING_VALUE.match(body)
        if match is None:
            return None
        value = match.group(0)
        # A currency sign opens the value ("$5", "\$5"); a lone "$" without a closing one is not a math span.
        value = value.replace("\\$", "").replace("$", "")
    return _as_answer(value, source)


def _leading_math_span(body: str) -> str | None:
    for opener, closer in _MATH_SPANS:
        if body.startswith(opener):
            close = body.find(closer, len(opener))
            if close > len(opener):
                return body[len(opener) : close]
    return None


def _as_answer(value: str, source: str) -> FinalAnswer | None:
    """Cut a value to its last right-hand side and its first item, and mark an unevaluated expression."""
    value = value.split("=")[-1]
    value = _NEGATED_TAIL.split(value, maxsplit=1)[0]
    # Markdown bold ("**18**") and closing punctuation are not part of the value.
    value = value.strip().strip("*").strip().rstrip(".,;:([{").strip()
    # A value holds a digit or a letter of its own: "\\boxed{}" or "$" alone state nothing.
    if not any(ch.isalnum() for ch in re.sub(r"\\(?:boxed|fbox|text|mathrm)\b", "", value)):
        return None
    return FinalAnswer(value, source, _is_unevaluated(value))


def _kinds(text: str) -> list[tuple[str, int]]:
    """``text`` as arithmetic tokens: (kind, start) with kind ``num``, ``op`` or ``other``; spaces and parentheses
    dropped."""
    return [(m.lastgroup, m.start()) for m in _ARITH_TOKEN.finditer(text) if m.lastgroup != "skip"]  # type: ignore[misc]


def _is_unevaluated(value: str) -> bool:
    """True for numbers joined by operators (``0 + 9``, ``(4)\\times 3``, ``-2 - 1``): arithmetic left undone."""
    kinds = [kind for kind, _ in _kinds(value)]
    if kinds[:1] == ["op"] and value.lstrip("( ").startswith("-"):
        kinds = kinds[1:]  # a leading minus sign
    if len(kinds) < 3 or len(kinds) % 2 == 0:
        return False
    return all(kind == ("num" if i % 2 == 0 else "op") for i, kind in enumerate(kinds))


def _last_number(text: str) -> FinalAnswer | None:
    """The last number that is not negated and not a list index, widened to its math span or expression."""
    for match in reversed(list(_NUMBER.finditer(text))):
        start, end = match.span()
        before = text[max(0, start - 40) : start]
        if _NEGATION.search(before) or _STEP.search(before):
            continue
        if _LIST_INDEX.search(before) and text[end : end + 1] in (".", ")") and text[end + 1 : end + 2] in (" ", "\t"):
            continue
        span = _enclosing_math_span(text, start, end) or _enclosing_fraction(text, start, end)
        if span is not None:
            return _as_answer(span, "number")
        return _as_answer(_expression_around(text, start, end), "number")
    return None


def _enclosing_math_span(text: str, start: int, end: int) -> str | None:
    """The content of the ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` span holding ``text[start:end]``, if any."""
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        open_at = text.rfind(opener, 0, start)
        if open_at >= 0 and text.find(closer, open_at) >= end:
            return text[open_at + len(opener) : text.find(closer, open_at)]
    # Unescaped dollars pair up from the start of the text; the number is inside a span when an odd number of them
    # precede it and one follows.
    dollars = [m.start() for m in re.finditer(r"(?<!\\)\$", text)]
    before = [d for d in dollars if d < start]
    after = [d for d in dollars if d >= end]
    if len(before) % 2 == 1 and after:
        return text[before[-1] + 1 : after[0]]
    return None


def _enclosing_fraction(text: str, start: int, end: int) -> str | None:
    """A ``\\frac{a}{b}`` outside math delimiters that holds ``text[start:end]`` (a bare ``x = \\frac{3}{4}``)."""
    window_start = max(0, start - 60)
    for match in _FRACTION.finditer(text[window_start : end + 60]):
        if window_start + match.start() <= start and end <= window_start + match.end():
            return match.group(0)
    return None


def _expression_around(text: str, start: int, end: int) -> str:
    """The number at ``text[start:end]`` with the arithmetic it belongs to on its left (``0 + 9`` for the 9)."""
    window_start = max(0, start - 200)
    tokens = _kinds(text[window_start:start])
    begin = start
    # Walk left over "<num> <op>" pairs; stop at the first token that breaks the pattern.
    while len(tokens) >= 2 and tokens[-1][0] == "op" and tokens[-2][0] == "num":
        begin = window_start + tokens[-2][1]
        tokens = tokens[:-2]
    if begin == start and tokens and tokens[-1][0] == "op" and text[start - 1 : start] == "-":
        begin = start - 1  # a negative number: "x = -3"
    return text[begin:end]
