"""Variants by name: a user's own loss aggregation and advantage scaling, registered and named like the built-ins."""

import pytest
import torch

from mgrpo_pl.algo.advantages import ADVANTAGE_SCALINGS, group_advantages
from mgrpo_pl.algo.losses import LOSS_AGGREGATIONS, aggregate
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.settings import LossSettings


@pytest.fixture
def registered():
    """Register two user variants for one test, then remove them (the registries are process-wide)."""

    @LOSS_AGGREGATIONS.register("token-sum")
    def token_sum(masked, tokens_per_row, seqs, tokens, length):
        return masked.sum(), seqs.new_ones(())

    @ADVANTAGE_SCALINGS.register("sign")
    def sign(rewards, centred, eps):
        return torch.sign(centred)

    yield
    del LOSS_AGGREGATIONS._functions["token-sum"], ADVANTAGE_SCALINGS._functions["sign"]


def test_a_registered_aggregation_is_used_by_name(registered):
    loss = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(aggregate(loss, mask, "token-sum")) == 1.0 + 2.0 + 3.0  # by hand: the unmasked tokens' sum
    assert LossSettings(aggregation="token-sum").aggregation == "token-sum"  # the setting accepts it too


def test_a_registered_advantage_scaling_is_used_by_name(registered):
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    # Group means 0.5 and 0.75; the sign of each centred reward, by hand.
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, 1.0, -1.0]])
    assert torch.equal(group_advantages(rewards, "sign"), expected)
    assert RolloutConfig(advantage_scaling="sign").advantage_scaling == "sign"


def test_unknown_names_list_the_known_ones_and_the_flag():
    known = "choose from seq-mean-token-mean, token-mean"
    with pytest.raises(ConfigError, match=rf"--model\.loss\.aggregation 'sum' is unknown; {known}"):
        LossSettings(aggregation="sum")
    with pytest.raises(ConfigError, match=r"--data\.rollout\.advantage_scaling 'rank' is unknown; choose from group"):
        RolloutConfig(advantage_scaling="rank")


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="registered already"):
        LOSS_AGGREGATIONS.register("token-mean")(lambda *args: args)
