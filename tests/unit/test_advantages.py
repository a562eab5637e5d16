"""Group-relative advantages on hand-computed groups."""

from __future__ import annotations

import math

import pytest
import torch

from mgrpo_pl.algo import AdvantageScaling, group_advantages


def test_group_scaling_two_of_four_correct() -> None:
    # r = [1, 0, 0, 1]: mean 0.5, deviations +-0.5, sum of squares 4 * 0.25 = 1,
    # sample variance 1 / (4 - 1) = 1/3, std = sqrt(1/3) = 0.5773502691896258.
    # A = +-0.5 / (0.5773502691896258 + 1e-6) = +-0.8660239038...
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    a = 0.5 / (0.5773502691896258 + 1e-6)
    assert a == pytest.approx(0.86602390, abs=1e-8)
    torch.testing.assert_close(adv, torch.tensor([[a, -a, -a, a]]), atol=1e-6, rtol=0)
    assert adv.dtype == torch.float32


def test_group_scaling_one_of_four_correct_eps_zero() -> None:
    # r = [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25],
    # sum of squares 0.5625 + 3 * 0.0625 = 0.75, sample variance 0.75 / 3 = 0.25, std 0.5.
    # A = [0.75 / 0.5, -0.25 / 0.5, ...] = [1.5, -0.5, -0.5, -0.5].
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), scaling=AdvantageScaling.GROUP, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]), atol=1e-6, rtol=0)


def test_groups_are_independent() -> None:
    # Row 0 as in the test above (eps 0): [1.5, -0.5, -0.5, -0.5].
    # Row 1 = [3, 1, 1, 3]: mean 2, deviations +-1, variance 4 / 3, std 1.1547005383792515,
    # A = +-1 / 1.1547005383792515 = +-0.8660254037844386 (same shape as [1, 0, 0, 1], scaled by 2).
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 3.0]]), eps=0.0)
    b = 0.8660254037844386
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [b, -b, -b, b]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_batch_scaling_uses_std_of_all_rewards() -> None:
    # Group means: row 0 = 1/4 = 0.25, row 1 = 2/4 = 0.5.
    # All 8 rewards: three 1s, five 0s, mean 3/8 = 0.375;
    # squared deviations 3 * 0.625^2 + 5 * 0.375^2 = 1.171875 + 0.703125 = 1.875; sample variance 1.875 / 7,
    # std = sqrt(0.26785714...) = 0.5175491695...
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    std = math.sqrt(1.875 / 7)
    assert std == pytest.approx(0.5175491695, abs=1e-9)
    expected = torch.tensor(
        [
            [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std],  # 1.4491377, -0.4830459
            [0.5 / std, 0.5 / std, -0.5 / std, -0.5 / std],  # +-0.9660918
        ]
    )
    torch.testing.assert_close(group_advantages(rewards, "batch", eps=0.0), expected, atol=1e-6, rtol=0)
    assert expected[0, 0].item() == pytest.approx(1.4491377, abs=1e-6)


def test_none_scaling_only_centres() -> None:
    # Row 0: mean 0.25 -> [0.75, -0.25, -0.25, -0.25]. Row 1: [2, 0.5, 0, 1.5] mean 4/4 = 1 -> [1, -0.5, -1, 0.5].
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.5, 0.0, 1.5]])
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, -0.5, -1.0, 0.5]])
    torch.testing.assert_close(group_advantages(rewards, "none"), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_all_equal_groups_are_exactly_zero(scaling: str) -> None:
    # 0.1 + 0.1 + 0.1 is not 0.3 in floating point, so r - mean(r) need not be 0 without the explicit zeroing.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    adv = group_advantages(rewards, scaling)
    assert torch.equal(adv[:3], torch.zeros(3, 3))
    assert adv[3].abs().sum() > 0.5  # the mixed group still gets a signal


@pytest.mark.parametrize("scaling", list(AdvantageScaling))
def test_group_size_one_gives_zero_not_nan(scaling: AdvantageScaling) -> None:
    adv = group_advantages(torch.tensor([[1.0], [0.0], [0.5]]), scaling)
    assert torch.equal(adv, torch.zeros(3, 1))


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_empty_batch(scaling: str) -> None:
    adv = group_advantages(torch.zeros(0, 4), scaling)
    assert adv.shape == (0, 4)
    assert adv.dtype == torch.float32


def test_integer_and_double_rewards_give_float32() -> None:
    # [1, 0]: mean 0.5, sample variance (0.25 + 0.25) / 1 = 0.5, std sqrt(0.5) = 0.70710678;
    # A = +-0.5 / 0.70710678 = +-0.70710678 (eps 0).
    a = 0.5 / math.sqrt(0.5)
    for rewards in (torch.tensor([[1, 0]]), torch.tensor([[1.0, 0.0]], dtype=torch.float64)):
        adv = group_advantages(rewards, eps=0.0)
        assert adv.dtype == torch.float32
        torch.testing.assert_close(adv, torch.tensor([[a, -a]]), atol=1e-6, rtol=0)


def test_unknown_scaling_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from group, batch, none"):
        group_advantages(torch.zeros(2, 4), "std")


def test_rejects_non_2d_rewards() -> None:
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.zeros(8))
