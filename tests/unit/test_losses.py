"""Clipped surrogate, k3 KL, aggregation and stats: hand-computed numbers and a loop reference of paper Eq. 3."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from mgrpo_pl.algo import (
    LossAggregation,
    aggregate,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    loss_stats,
    policy_loss,
    truncated_is_weights,
)

# Six tokens of one completion, old_logp = 0 so r = exp(logp) = the listed ratio.
RATIOS = [1.5, 0.5, 1.5, 0.5, 1.1, 0.9]
ADVS = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.tensor([[math.log(r) for r in RATIOS]], requires_grad=True)
    return logp, torch.zeros(1, 6), torch.tensor([ADVS])


# ---------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_hand_values() -> None:
    logp, old, adv = _hand_case()
    objective, ratio, low, high = clipped_surrogate(logp, old, adv, eps_low=0.2)
    # r=1.5, A=+1: min(1.5, clip->1.2) = 1.2, clipped high.
    # r=0.5, A=-1: min(-0.5, clip 0.8 * -1 = -0.8) = -0.8, clipped low.
    # r=1.5, A=-1: min(-1.5, -1.2) = -1.5, unclipped branch (pessimistic).
    # r=0.5, A=+1: min(0.5, 0.8) = 0.5, unclipped branch.
    # r=1.1, A=+1: inside [0.8, 1.2] -> 1.1.   r=0.9, A=-1: inside -> -0.9.
    torch.testing.assert_close(objective, torch.tensor([[1.2, -0.8, -1.5, 0.5, 1.1, -0.9]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ratio, torch.tensor([RATIOS]), atol=1e-6, rtol=0)
    assert high.tolist() == [[True, False, False, False, False, False]]
    assert low.tolist() == [[False, True, False, False, False, False]]


def test_gradient_is_zero_on_clipped_tokens() -> None:
    logp, old, adv = _hand_case()
    objective, *_ = clipped_surrogate(logp, old, adv, eps_low=0.2)
    objective.sum().backward()
    # d(r A)/d logp = r A on the unclipped branch; the clipped branch is a constant.
    # Tokens: clipped 0, clipped 0, -1.5, 0.5, 1.1, -0.9.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.5, 0.5, 1.1, -0.9]]), atol=1e-6, rtol=0)


def test_clip_higher() -> None:
    # eps_low 0.2, eps_high 0.28: upper bound 1.28, lower bound 0.8.
    # r=1.5,  A=+1: min(1.5, 1.28) = 1.28, clipped high.
    # r=1.25, A=+1: inside [0.8, 1.28] -> 1.25 (with a symmetric 0.2 it would be clipped to 1.2).
    # r=0.75, A=-1: min(-0.75, -0.8) = -0.8, clipped low (the lower bound is unchanged).
    logp = torch.tensor([[math.log(1.5), math.log(1.25), math.log(0.75)]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    objective, _, low, high = clipped_surrogate(logp, torch.zeros(1, 3), adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(objective, torch.tensor([[1.28, 1.25, -0.8]]), atol=1e-6, rtol=0)
    assert high.tolist() == [[True, False, False]]
    assert low.tolist() == [[False, False, True]]
    symmetric, _, _, high_sym = clipped_surrogate(logp, torch.zeros(1, 3), adv, eps_low=0.2)
    torch.testing.assert_close(symmetric, torch.tensor([[1.2, 1.2, -0.8]]), atol=1e-6, rtol=0)
    assert high_sym.tolist() == [[True, True, False]]


def test_per_sequence_advantages_broadcast_over_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    logp, old = torch.randn(2, 3, generator=gen) * 0.3, torch.randn(2, 3, generator=gen) * 0.3
    per_seq = torch.tensor([2.0, -1.0])
    a = clipped_surrogate(logp, old, per_seq)
    b = clipped_surrogate(logp, old, per_seq[:, None].expand(2, 3).clone())
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a[0].shape == a[2].shape == (2, 3)


def test_zero_advantage_and_extreme_log_ratio() -> None:
    # A = 0: objective 0, nothing clipped. log-ratio +-100 is clamped to +-20: r = exp(20) = 4.85e8 and exp(-20).
    logp = torch.tensor([[0.3, 100.0, -100.0]])
    adv = torch.tensor([[0.0, -1.0, 1.0]])
    objective, ratio, low, high = clipped_surrogate(logp, torch.zeros(1, 3), adv)
    assert torch.isfinite(objective).all()
    assert objective[0, 0].item() == 0.0
    assert ratio[0, 1].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    assert ratio[0, 2].item() == pytest.approx(math.exp(-20.0), rel=1e-6)
    # r = exp(-20) < 0.8 with A > 0: the unclipped branch r * A is the min, so it is not "clipped".
    assert not low.any() and not high.any()


def test_bad_clip_arguments_raise() -> None:
    with pytest.raises(ValueError, match="clip ranges"):
        clipped_surrogate(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), eps_low=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


# ---------------------------------------------------------------- k3 KL


def test_k3_hand_values() -> None:
    # logp = 0, ref = ln 0.5: d = ref - logp = -0.6931472, exp(d) - d - 1 = 0.5 + 0.6931472 - 1 = 0.1931472.
    # logp = ln 0.5, ref = 0: d = +0.6931472, 2 - 0.6931472 - 1 = 0.3068528.
    logp = torch.tensor([[0.0, math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.5), 0.0]])
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(
        kl, torch.tensor([[0.5 - math.log(0.5) - 1.0, 2.0 - math.log(2.0) - 1.0]]), atol=1e-6, rtol=0
    )
    assert kl[0, 0].item() == pytest.approx(0.1931472, abs=1e-6)
    # d KL / d logp = 1 - exp(d): 1 - 0.5 = 0.5 and 1 - 2 = -1.
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, -1.0]]), atol=1e-6, rtol=0)


def test_k3_zero_when_equal_and_positive_otherwise() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 9, generator=gen) * 5
    assert torch.equal(k3_kl(logp, logp.clone()), torch.zeros(4, 9))
    kl = k3_kl(logp, logp + torch.randn(4, 9, generator=gen))
    assert (kl > 0).all()


def test_k3_keeps_small_differences() -> None:
    # d = 1e-3: exp(d) - d - 1 = d^2/2 + d^3/6 + ... = 5.0016671e-7. Computing exp(d) - 1 in float32 would lose
    # ~20% here (one ulp of 1.001 is 1.2e-7); expm1 keeps it to ~1e-4 relative.
    kl = k3_kl(torch.zeros(1, 1), torch.full((1, 1), 1e-3))
    assert kl.item() == pytest.approx(1e-6 / 2 + 1e-9 / 6, rel=1e-3)


# ---------------------------------------------------------------- policy loss


def test_policy_loss_with_kl_hand_value() -> None:
    # One token: logp = old = 0 -> r = 1, A = 1 -> objective 1. ref = ln 0.5 -> KL 0.1931472 (above).
    # loss = -1 + 0.1 * 0.1931472 = -0.9806853; d loss / d logp = -r A + beta (1 - exp(d)) = -1 + 0.1 * 0.5 = -0.95.
    logp = torch.zeros(1, 1, requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 1), torch.ones(1), ref_logp=torch.full((1, 1), math.log(0.5)), beta=0.1)
    assert out.loss.item() == pytest.approx(-1.0 + 0.1 * (0.5 + math.log(2.0) - 1.0), abs=1e-6)
    assert out.loss.item() == pytest.approx(-0.9806853, abs=1e-6)
    assert out.kl is not None and out.kl.item() == pytest.approx(0.1931472, abs=1e-6)
    out.loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-0.95, abs=1e-6)


def test_policy_loss_without_reference() -> None:
    logp, old, adv = _hand_case()
    out = policy_loss(logp, old, adv)
    assert out.kl is None
    torch.testing.assert_close(out.loss, -torch.tensor([[1.2, -0.8, -1.5, 0.5, 1.1, -0.9]]), atol=1e-6, rtol=0)
    # beta = 0 with a reference: the KL is reported but does not enter the loss.
    out0 = policy_loss(logp, old, adv, ref_logp=torch.zeros(1, 6), beta=0.0)
    assert out0.kl is not None and (out0.kl > 0).any()
    torch.testing.assert_close(out0.loss, out.loss, atol=0, rtol=0)


def test_truncated_is_weights_hand_values() -> None:
    # ratios trainer/engine: e^0 = 1, e^0.5 = 1.6487, e^2 = 7.389 -> capped at 2, e^-1 = 0.3679 (kept: only the top
    # is truncated); a wild pair (|log-ratio| 80) gives the cap, not inf.
    trainer = torch.tensor([[0.0, 0.5, 2.0, -1.0, 80.0]])
    engine = torch.zeros(1, 5)
    w = truncated_is_weights(trainer, engine, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 2.0, math.exp(-1.0), 2.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_is_weights(trainer, engine, cap=0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        truncated_is_weights(trainer, torch.zeros(1, 4), cap=2.0)


def test_is_weights_scale_the_surrogate_not_the_kl() -> None:
    # One token, r = 1, A = 1, ref = ln 0.5 (KL 0.1931472, gradient factor 0.5 as above), weight 0.5:
    # loss = -0.5 * 1 + 0.1 * KL; d loss / d logp = -0.5 * r A + beta (1 - exp(d)) = -0.5 + 0.05 = -0.45.
    logp = torch.zeros(1, 1, requires_grad=True)
    ref = torch.full((1, 1), math.log(0.5))
    out = policy_loss(
        logp, torch.zeros(1, 1), torch.ones(1), ref_logp=ref, beta=0.1, is_weights=torch.full((1, 1), 0.5)
    )
    assert out.loss.item() == pytest.approx(-0.5 + 0.1 * 0.1931472, abs=1e-6)
    out.loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-0.45, abs=1e-6)
    with pytest.raises(ValueError, match="is_weights must match"):
        policy_loss(logp, torch.zeros(1, 1), torch.ones(1), is_weights=torch.ones(1, 2))


def test_beta_without_reference_raises() -> None:
    with pytest.raises(ValueError, match="needs a reference"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), beta=0.04)
    with pytest.raises(ValueError, match="beta"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), ref_logp=torch.zeros(1, 2), beta=-1.0)


# ---------------------------------------------------------------- aggregation


def _agg_case() -> tuple[torch.Tensor, torch.Tensor]:
    # Row 0 keeps tokens 1, 2; row 1 keeps token 4; row 2 is fully masked and holds a NaN that must not leak.
    loss = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0], [float("nan"), 8.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    return loss, mask


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("seq-mean-token-mean", {}, (1.5 + 4.0) / 2),  # row means (1+2)/2 = 1.5 and 4/1 = 4 -> 2.75
        ("seq-mean-token-mean", {"num_seqs": 4}, 5.5 / 4),  # 1.375
        ("token-mean", {}, 7.0 / 3),  # (1 + 2 + 4) / 3 valid tokens = 2.3333333
        ("token-mean", {"num_tokens": 10}, 0.7),
        ("seq-mean-token-sum-norm", {}, 7.0 / (2 * 3)),  # 7 / (2 seqs * T=3) = 1.1666667
        ("seq-mean-token-sum-norm", {"norm_length": 4}, 7.0 / 8),  # 0.875
        (LossAggregation.SEQ_MEAN_TOKEN_SUM_NORM, {"num_seqs": 1, "norm_length": 7}, 1.0),
    ],
)
def test_aggregate_hand_values(mode: str, kwargs: dict, expected: float) -> None:
    loss, mask = _agg_case()
    value = aggregate(loss, mask, mode, **kwargs)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(value, aggregate(loss, mask.bool(), mode, **kwargs))
    value.backward()
    assert torch.isfinite(loss.grad).all()
    assert loss.grad[2].abs().sum() == 0  # the masked row gets no gradient


def test_aggregate_gradient_weights() -> None:
    loss, mask = _agg_case()
    aggregate(loss, mask).backward()
    # seq-mean-token-mean: each token weighs 1 / (|o_i| * num_seqs): row 0 -> 1/(2*2) = 0.25, row 1 -> 1/(1*2) = 0.5.
    torch.testing.assert_close(loss.grad, torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("mode", list(LossAggregation))
def test_micro_batches_sum_to_full_batch(mode: LossAggregation) -> None:
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(7, 5, generator=gen)
    lengths = torch.tensor([5, 1, 3, 0, 2, 4, 5])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    full = aggregate(loss, mask, mode)
    num_seqs = float((lengths > 0).sum())  # 6
    num_tokens = float(lengths.sum())  # 20
    parts = [
        aggregate(loss[rows], mask[rows], mode, num_seqs=num_seqs, num_tokens=num_tokens)
        for rows in (slice(0, 2), slice(2, 3), slice(3, 7))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


@pytest.mark.parametrize("mode", list(LossAggregation))
@pytest.mark.parametrize("kwargs", [{}, {"num_seqs": 0, "num_tokens": 0}])
def test_all_masked_gives_connected_zero(mode: LossAggregation, kwargs: dict) -> None:
    loss = torch.randn(2, 3, requires_grad=True)
    value = aggregate(loss, torch.zeros(2, 3, dtype=torch.bool), mode, **kwargs)
    assert value.item() == 0.0
    assert value.requires_grad
    value.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 3))


def test_aggregate_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="choose from seq-mean-token-mean, token-mean, seq-mean-token-sum-norm"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "seq-mean")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="norm_length"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "seq-mean-token-sum-norm", norm_length=0)


# ---------------------------------------------------------------- loss stats


def test_loss_stats_hand_values() -> None:
    logp, old, adv = _hand_case()
    out = policy_loss(logp, old, adv, ref_logp=torch.zeros(1, 6), beta=0.1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token (r = 0.9) is padding
    stats = loss_stats(out, mask)
    # Valid tokens 0..4: clipped high = {0}, clipped low = {1} -> 1/5, 1/5, either 2/5.
    # ratio mean = (1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5 = 5.1 / 5 = 1.02.
    # k3 with ref 0, d = -ln r: KL = 1/r + ln r - 1:
    #   r=1.5: 0.6666667 + 0.4054651 - 1 = 0.0721318;  r=0.5: 2 - 0.6931472 - 1 = 0.3068528;
    #   r=1.1: 0.9090909 + 0.0953102 - 1 = 0.0044011.  Mean = (2*0.0721318 + 2*0.3068528 + 0.0044011) / 5.
    kl = [1 / r + math.log(r) - 1 for r in RATIOS[:5]]
    assert sum(kl) / 5 == pytest.approx((2 * 0.0721318 + 2 * 0.3068528 + 0.0044011) / 5, abs=1e-6)
    expected = {
        "clip_frac_low": 0.2,
        "clip_frac_high": 0.2,
        "clip_frac": 0.4,
        "ratio_mean": 1.02,
        "kl_mean": sum(kl) / 5,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, abs=1e-6), key
        assert not stats[key].requires_grad


def test_loss_stats_empty_mask_and_no_kl() -> None:
    logp, old, adv = _hand_case()
    out = policy_loss(logp, old, adv)
    empty = loss_stats(out, torch.zeros(1, 6, dtype=torch.bool))
    assert all(v.item() == 0.0 for v in empty.values())
    assert loss_stats(out, torch.ones(1, 6)).get("kl_mean").item() == 0.0


# ---------------------------------------------------------------- loop reference of paper Eq. 3


def _eq3_reference(
    logp: list[list[float]],
    old: list[list[float]],
    ref: list[list[float]],
    lengths: list[int],
    rewards: list[list[float]],
    beta: float,
    eps_low: float,
    eps_high: float,
    adv_eps: float,
) -> float:
    """J of paper Eq. 3 averaged over prompts, written from the formula with plain Python loops."""
    num_groups, group_size = len(rewards), len(rewards[0])
    per_prompt = []
    for g in range(num_groups):
        mean_r = sum(rewards[g]) / group_size
        std_r = statistics.stdev(rewards[g])  # sample std (n - 1)
        inner = 0.0
        for i in range(group_size):
            row = g * group_size + i
            adv = (rewards[g][i] - mean_r) / (std_r + adv_eps)
            token_sum = 0.0
            for t in range(lengths[row]):
                r = math.exp(logp[row][t] - old[row][t])
                surrogate = min(r * adv, max(1 - eps_low, min(r, 1 + eps_high)) * adv)
                ratio_ref = math.exp(ref[row][t] - logp[row][t])  # pi_ref / pi_theta
                kl = ratio_ref - math.log(ratio_ref) - 1
                token_sum += surrogate - beta * kl
            inner += token_sum / lengths[row]
        per_prompt.append(inner / group_size)
    return sum(per_prompt) / num_groups


@pytest.mark.parametrize(("seed", "group_size", "eps_high"), [(0, 4, None), (1, 6, None), (2, 8, 0.28), (3, 5, 0.3)])
def test_policy_loss_matches_loop_reference_of_eq3(seed: int, group_size: int, eps_high: float | None) -> None:
    rng = random.Random(seed)
    num_groups, max_len, beta, eps_low, adv_eps = 3, 9, 0.04, 0.2, 1e-6
    batch = num_groups * group_size
    lengths = [rng.randint(1, max_len) for _ in range(batch)]
    rewards = [[float(rng.random() < 0.5) for _ in range(group_size)] for _ in range(num_groups)]
    old = [[rng.uniform(-4.0, -0.1) for _ in range(max_len)] for _ in range(batch)]
    # Log-ratios up to +-0.6 (r in [0.55, 1.82]) so tokens land on both sides of the clip range.
    logp = [[o + rng.uniform(-0.6, 0.6) for o in row] for row in old]
    ref = [[o + rng.uniform(-0.5, 0.5) for o in row] for row in old]
    # Round through float32 once so the reference and the tensors see the same inputs.
    logp, old, ref = (torch.tensor(x).tolist() for x in (logp, old, ref))

    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    advantages = group_advantages(torch.tensor(rewards), "group", eps=adv_eps).reshape(batch)
    out = policy_loss(
        torch.tensor(logp),
        torch.tensor(old),
        advantages,
        ref_logp=torch.tensor(ref),
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
    )
    loss = aggregate(out.loss, mask, "seq-mean-token-mean")

    expected_j = _eq3_reference(
        logp, old, ref, lengths, rewards, beta, eps_low, eps_low if eps_high is None else eps_high, adv_eps
    )
    assert -loss.item() == pytest.approx(expected_j, abs=1e-5)
    # The data must actually exercise both clip sides, or this test would not cover the min/clip logic.
    stats = loss_stats(out, mask)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
