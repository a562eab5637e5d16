"""Pure tensor math of MGRPO: group advantages, token log-probs, the clipped policy loss, KL and aggregation."""

from mgrpo_pl.algo.advantages import AdvantageScaling, group_advantages
from mgrpo_pl.algo.logprobs import token_entropy, token_logprobs
from mgrpo_pl.algo.losses import (
    LossAggregation,
    PolicyLossOutput,
    aggregate,
    clipped_surrogate,
    k3_kl,
    loss_stats,
    policy_loss,
    truncated_is_weights,
)

__all__ = [
    "AdvantageScaling",
    "LossAggregation",
    "PolicyLossOutput",
    "aggregate",
    "clipped_surrogate",
    "group_advantages",
    "k3_kl",
    "loss_stats",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
    "truncated_is_weights",
]
