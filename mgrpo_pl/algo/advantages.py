"""Group-relative advantages (GRPO, used by both MGRPO layers).

For one prompt the policy samples a group of G completions with scalar rewards ``r_1..r_G``. GRPO replaces a learned
value baseline with the group's own mean reward, and every token of completion ``o_i`` receives the same advantage
``A_i`` (the ``A_hat_{i,t}`` of the paper's Eq. 1, 3 and 6, which is constant over t for outcome rewards):

- ``group`` (the paper, DeepSeekMath GRPO): ``A_i = (r_i - mean(r)) / (std(r) + eps)``.
- ``batch``: the same centring per group, but divided by the std of ALL rewards in the batch. This departs from the
  paper; it keeps groups with a tiny spread (one success out of eight) from being blown up relative to the others.
- ``none`` (Dr. GRPO): ``A_i = r_i - mean(r)``. Departs from the paper: dropping the std removes the question-level
  difficulty bias that dividing by a per-group std introduces.

``std`` is the sample (unbiased, ``n - 1``) standard deviation, as TRL and verl compute it. A group whose rewards are
all equal carries no learning signal, so its advantages are exactly 0.0; this also covers groups of size 1, whose
sample std is undefined.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor

from mgrpo_pl.algo.registry import Registry

__all__ = ["ADVANTAGE_SCALINGS", "AdvantageScaling", "group_advantages"]


class AdvantageScaling(str, Enum):
    """How group-centred rewards are scaled into advantages (chosen by name in the config)."""

    GROUP = "group"
    """Paper / GRPO: ``(r - mean_group) / (std_group + eps)``."""
    BATCH = "batch"
    """``(r - mean_group) / (std over all rewards of the batch + eps)``."""
    NONE = "none"
    """Dr. GRPO: ``r - mean_group``."""


ScalingFn = Callable[[Tensor, Tensor, float], Tensor]
#: ``(rewards [groups, size], group-centred rewards, eps) -> advantages``.
ADVANTAGE_SCALINGS: Registry[ScalingFn] = Registry("advantage scaling", "--data.rollout.advantage_scaling")


@ADVANTAGE_SCALINGS.register(AdvantageScaling.GROUP.value)
def _by_group_std(rewards: Tensor, centred: Tensor, eps: float) -> Tensor:
    # A size-1 group has no sample std (0/0); it is zeroed by the caller, so any finite stand-in works here.
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + eps)


@ADVANTAGE_SCALINGS.register(AdvantageScaling.BATCH.value)
def _by_batch_std(rewards: Tensor, centred: Tensor, eps: float) -> Tensor:
    std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return centred / (std + eps)


@ADVANTAGE_SCALINGS.register(AdvantageScaling.NONE.value)
def _unscaled(rewards: Tensor, centred: Tensor, eps: float) -> Tensor:
    return centred


def group_advantages(rewards: Tensor, scaling: AdvantageScaling | str = "group", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages.

    Args:
        rewards: ``[num_groups, group_size]`` rewards, one row per prompt.
        scaling: a name in ``ADVANTAGE_SCALINGS`` (built-ins: ``"group"``, ``"batch"``, ``"none"``).
        eps: added to the std before dividing, so a near-constant group cannot divide by ~0.

    Returns:
        ``[num_groups, group_size]`` float32 advantages. Groups whose rewards are all equal (including groups of
        size 1) are exactly 0.0; an empty input gives an empty output.

    Raises:
        ValueError: if ``rewards`` is not 2-D or ``scaling`` is not a known name.
    """
    scale = ADVANTAGE_SCALINGS.get(scaling)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.detach().float()
    if rewards.numel() == 0:
        return torch.zeros_like(rewards)

    centred = rewards - rewards.mean(dim=1, keepdim=True)
    advantages = scale(rewards, centred, eps)

    # The mean of equal floats need not round back to the value itself (e.g. three 0.1s), and the residue divided
    # by eps would be a spurious non-zero advantage, so constant groups are zeroed explicitly.
    constant = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages)
