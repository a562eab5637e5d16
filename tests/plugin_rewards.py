"""Plug-in rewards with the RewardFunction call shape, for tests that need layer-2 groups from a random model.

A random tiny model never answers arithmetic right, so the math reward would leave every layer-2 group empty.
These rules score real generations so that some probes verify and others fail.
"""

import torch

from mgrpo_pl.rewards import Reward


class ParityReward(Reward):
    """1 for completions with an even character count, else 0. Records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, completions, answers):
        assert len(completions) == len(answers)
        self.calls.append(list(completions))
        return torch.tensor([float(len(c) % 2 == 0) for c in completions])


class NeverReward(Reward):
    """0 for everything: no probe ever verifies (G' = 0)."""

    def __call__(self, completions, answers):
        return torch.zeros(len(completions))
