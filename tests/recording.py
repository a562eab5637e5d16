"""What rollout tests record around the real engine and reward: every call, so that the test can derive the method's
results from what was generated and asked, and a reward that depends on both the text and the gold answer."""

from __future__ import annotations

from typing import NamedTuple

import torch

from mgrpo_pl.rewards import Reward
from mgrpo_pl.rollout.types import Generation, SamplingConfig


class GenerateCall(NamedTuple):
    prompts: list[list[int]]
    n: int
    out: Generation
    sampling: SamplingConfig


class Recorder:
    """The real engine (nothing replaced), with each ``generate`` call's prompts, n, result and sampling kept."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.calls: list[GenerateCall] = []

    def generate(self, prompts, sampling, n=1):
        out = self._engine.generate(prompts, sampling, n=n)
        self.calls.append(GenerateCall([list(p) for p in prompts], n, out, sampling))
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


def score(text: str, gold: str) -> float:
    """0, 0.5 or 1 from the text's length and the gold answer: depends on both, and not only 0/1."""
    return ((len(text) + int(gold)) % 3) / 2


class GoldModReward(Reward):
    """``score`` per item; records each call's (completions, answers)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, completions, answers):
        self.calls.append((list(completions), list(answers)))
        return torch.tensor([score(c, a) for c, a in zip(completions, answers)])
