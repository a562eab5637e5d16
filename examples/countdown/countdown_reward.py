"""A reward for the countdown task: reach the target with each given number exactly once, using + - * / and
parentheses. The gold "answer" of a problem is JSON: ``{"target": 24, "numbers": [3, 8, 1]}``.

The completion's answer is the expression on its last line that holds one (``... = 24`` and a leading
``Answer:`` are allowed). It is parsed, never run: only integers, the four operations and parentheses are accepted,
and it is evaluated with exact fractions.
"""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction

import torch

from mgrpo_pl.rewards import Reward
from mgrpo_pl.rewards.reading import FinalAnswer

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
_EXPRESSION = re.compile(r"^[\d\s+\-*/()]+$")


def last_expression(text: str) -> str | None:
    """The expression on the last line that holds one, without ``Answer:`` and a trailing ``= <value>``."""
    for line in reversed(text.strip().splitlines()):
        candidate = re.sub(r"^\s*(?:the\s+)?answer\s*(?:is|:)\s*", "", line, flags=re.I).split("=")[0].strip()
        candidate = candidate.rstrip(".")
        if candidate and re.search(r"\d", candidate) and _EXPRESSION.match(candidate):
            return candidate
    return None


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """The exact value of ``expression`` and the numbers it uses, or None if it is not +-*/ over integers."""
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            divisor = value(node.right)
            if divisor == 0:
                raise ZeroDivisionError
            return value(node.left) / divisor
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return value(tree.body), used
    except (ValueError, ZeroDivisionError):
        return None


class CountdownReward(Reward):
    """1.0 when the last expression uses exactly the given numbers and equals the target, else 0.0."""

    def __call__(self, completions: list[str], answers: list[str]) -> torch.Tensor:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        return torch.tensor([self.score(c, a) for c, a in zip(completions, answers)], dtype=torch.float32)

    @staticmethod
    def score(completion: str, answer: str) -> float:
        gold = json.loads(answer)
        expression = last_expression(completion)
        result = evaluate(expression) if expression is not None else None
        if result is None:
            return 0.0
        value, used = result
        return float(value == gold["target"] and sorted(used) == sorted(gold["numbers"]))

    def final_answer(self, text: str) -> FinalAnswer | None:
        # Turn 2 ends with the correction's expression when it states one, else keeps turn 1's (the same reading
        # as the reward's).
        expression = last_expression(text)
        return FinalAnswer(expression, "line") if expression is not None else None
