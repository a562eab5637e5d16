"""Rewards: the ``RewardFunction`` call shape and the timeout-safe math-verify reward.

Importing this package does not import torch (``MathReward`` defers it to its first call), so reward worker processes,
which import it to run their task function, start in well under a second.
"""

from mgrpo_pl.rewards.answers import gsm8k_final_answer, last_boxed_content, normalize_gold
from mgrpo_pl.rewards.base import Reward, RewardFunction
from mgrpo_pl.rewards.math import MathReward

__all__ = ["MathReward", "Reward", "RewardFunction", "gsm8k_final_answer", "last_boxed_content", "normalize_gold"]
