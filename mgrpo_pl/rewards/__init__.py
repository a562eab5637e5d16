"""Rewards: the ``RewardFunction`` call shape and the timeout-safe math-verify reward.

Importing this package does not import torch (``MathReward`` defers it to its first call), so reward worker processes,
which import it to run their task function, start in well under a second.
"""

from mgrpo_pl.rewards.answers import gsm8k_final_answer, last_boxed_content, normalize_gold
from mgrpo_pl.rewards.base import Reward, RewardError, RewardFunction
from mgrpo_pl.rewards.math import MathReward
from mgrpo_pl.rewards.reading import ANSWER_FORMATS, FinalAnswer, read_final_answer

__all__ = [
    "ANSWER_FORMATS",
    "FinalAnswer",
    "MathReward",
    "Reward",
    "RewardError",
    "RewardFunction",
    "gsm8k_final_answer",
    "last_boxed_content",
    "normalize_gold",
    "read_final_answer",
]
