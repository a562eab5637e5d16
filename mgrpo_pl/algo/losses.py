"""The per-layer MGRPO policy loss: PPO-clipped surrogate, k3 KL penalty, and loss aggregation.

Both layers of MGRPO optimise the same GRPO objective (paper Eq. 3 for layer 1, Eq. 6 for layer 2):

    J = 1/G sum_i 1/|o_i| sum_t { min(r_it * A_it, clip(r_it, 1 - eps, 1 + eps) * A_it) - beta * D_KL,it }

with the importance ratio ``r_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)`` and the per-token k3 KL
estimator of Eq. 2, ``D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1``. The trainer minimises ``-J``:

- :func:`clipped_surrogate` gives the per-token ``min(...)`` term, :func:`k3_kl` the per-token KL, and
  :func:`policy_loss` the per-token loss ``-min(...) + beta * KL``.
- :func:`aggregate` reduces the ``[B, T]`` loss to a scalar. The default ``seq-mean-token-mean`` is the paper's
  ``1/G sum_i 1/|o_i| sum_t``: a mean over each completion's tokens, then a mean over completions. Taking the
  expectation over prompts with the same G per prompt, that is a mean over all B completions of the batch.

Departures from the paper, all opt-in by name:

- ``eps_high`` (DAPO's "clip-higher"): a separate, usually larger, upper clip bound; the paper uses one ``eps``.
- ``token-mean`` (DAPO): every token of the batch weighs the same, so long completions are not down-weighted.
- ``seq-mean-token-sum-norm`` (Dr. GRPO): token sums divided by a constant ``num_seqs * norm_length``, which removes
  the length bias of ``1/|o_i|``.
- ``is_weights`` (truncated importance sampling, "TIS"): when a separate engine (vLLM) samples the tokens, its
  probabilities differ slightly from the trainer's for the same weights (kernels, precision). Each token's surrogate
  is then multiplied by ``min(pi_trainer_old / pi_engine, cap)``, a detached weight that corrects the sampling
  distribution without letting a rare large ratio dominate (:func:`truncated_is_weights`). Off unless a cap is set.
- Eq. 6 writes ``1/H sum_j sum_h`` for layer 2, i.e. a sum over the G' kept queries; the default here averages over
  all layer-2 completions, so a prompt with many kept corrections does not get a larger step. The caller can
  reproduce the literal form by passing ``num_seqs = H``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from mgrpo_pl.algo.registry import Registry

__all__ = [
    "LOSS_AGGREGATIONS",
    "LossAggregation",
    "PolicyLossOutput",
    "aggregate",
    "clipped_surrogate",
    "k3_kl",
    "loss_stats",
    "policy_loss",
    "truncated_is_weights",
]

# exp(20) ~ 4.9e8 is already far outside any clip range, while exp(89) overflows float32 (and exp(-104) underflows to
# 0, making the KL's log term infinite). A stale or mismatched behaviour log-prob must not turn one token into inf/NaN
# that poisons the whole batch, so log-ratios are clamped before exponentiating.
_MAX_LOG_RATIO = 20.0


class LossAggregation(str, Enum):
    """How the ``[B, T]`` per-token loss is reduced to a scalar (chosen by name in the config)."""

    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    """Paper Eq. 3/6 (default): mean over a completion's tokens, then mean over completions."""
    TOKEN_MEAN = "token-mean"
    """DAPO: sum over all valid tokens / number of valid tokens."""
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
    """Dr. GRPO: sum over all valid tokens / (num_seqs * norm_length), with a constant norm_length."""


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: a NaN/inf in a padded position (e.g. from a garbage logit) times 0 would still be NaN.
    return torch.where(mask, values, torch.zeros_like(values))


AggregationFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", int], tuple[Tensor, Tensor]]
#: ``(masked loss [B, T], tokens per row [B], completions, tokens or None, length) -> (numerator, denominator)``.
LOSS_AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation", "--model.loss.aggregation")


@LOSS_AGGREGATIONS.register(LossAggregation.SEQ_MEAN_TOKEN_MEAN.value)
def _seq_mean_token_mean(
    masked: Tensor, tokens_per_row: Tensor, seqs: Tensor, tokens: Tensor | None, length: int
) -> tuple[Tensor, Tensor]:
    return (masked.sum(dim=1) / tokens_per_row.clamp_min(1).to(masked.dtype)).sum(), seqs


@LOSS_AGGREGATIONS.register(LossAggregation.TOKEN_MEAN.value)
def _token_mean(
    masked: Tensor, tokens_per_row: Tensor, seqs: Tensor, tokens: Tensor | None, length: int
) -> tuple[Tensor, Tensor]:
    return masked.sum(), tokens_per_row.sum() if tokens is None else tokens


@LOSS_AGGREGATIONS.register(LossAggregation.SEQ_MEAN_TOKEN_SUM_NORM.value)
def _seq_mean_token_sum_norm(
    masked: Tensor, tokens_per_row: Tensor, seqs: Tensor, tokens: Tensor | None, length: int
) -> tuple[Tensor, Tensor]:
    return masked.sum(), seqs * float(length)


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: LossAggregation | str = "seq-mean-token-mean",
    *,
    num_seqs: float | None = None,
    num_tokens: float | None = None,
    norm_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    To make micro-batches add up to the full batch, pass the GLOBAL ``num_seqs`` / ``num_tokens`` of the full batch
    to every micro-batch call and sum the results (seq-mean-token-mean needs only ``num_seqs``, since each row's own
    token mean does not depend on the other rows).

    Args:
        loss: ``[B, T]`` per-token loss.
        mask: ``[B, T]`` bool or 0/1 mask of the completion tokens.
        mode: a name in ``LOSS_AGGREGATIONS`` (the built-ins are the :class:`LossAggregation` members).
        num_seqs: normaliser over completions; default: rows with at least one valid token.
        num_tokens: normaliser of ``token-mean``; default: ``mask.sum()``.
        norm_length: the constant length of ``seq-mean-token-sum-norm``; default: ``T`` (``loss.shape[1]``).

    Returns:
        A scalar. Rows without a valid token contribute 0; a zero normaliser gives a 0.0 that is still connected to
        the graph (so ``backward()`` works on every rank of a distributed step), never NaN.

    Raises:
        ValueError: on an unknown mode, mismatched shapes, or a non-positive ``norm_length``.
    """
    combine = LOSS_AGGREGATIONS.get(mode)
    if loss.dim() != 2 or mask.shape != loss.shape:
        raise ValueError(f"loss and mask must both be [B, T], got {tuple(loss.shape)} and {tuple(mask.shape)}")
    if norm_length is not None and norm_length <= 0:
        raise ValueError(f"norm_length must be > 0, got {norm_length}")
    mask = mask.bool()
    masked = _masked(loss, mask)
    tokens_per_row = mask.sum(dim=1)
    # Normalisers stay tensors: calling .item() here would force a device sync on every micro-batch.
    seqs = (tokens_per_row > 0).sum() if num_seqs is None else torch.as_tensor(num_seqs, device=loss.device)

    tokens = None if num_tokens is None else torch.as_tensor(num_tokens, device=loss.device)
    length = loss.shape[1] if norm_length is None else norm_length
    numerator, denominator = combine(masked, tokens_per_row, seqs, tokens, length)

    # At least float32: bf16 cannot count tokens past 256 exactly.
    denominator = denominator.to(torch.promote_types(masked.dtype, torch.float32))
    nonzero = denominator != 0
    # Dividing by a stand-in 1 keeps the unused branch finite, so where() does not backpropagate 0 * inf = NaN.
    ratio = numerator / torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, ratio, masked.sum() * 0.0)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of ``KL(pi_theta || pi_ref)`` (paper Eq. 2, Schulman 2020).

    ``exp(d) - d - 1`` with ``d = ref_logp - logp``, computed as ``expm1(d) - d`` so small ``d`` keep their digits
    instead of cancelling against the ``- 1``. ``d`` is clamped to ``[-20, 20]`` (see ``_MAX_LOG_RATIO``).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy being trained.
        ref_logp: ``[B, T]`` log-probs of the same tokens under the frozen reference.

    Returns:
        ``[B, T]`` KL estimates, >= 0, exactly 0 where ``logp == ref_logp``.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp shapes differ: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    d = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.expm1(d) - d


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PPO-clipped surrogate objective per token (to MAXIMISE), the ``min(...)`` of paper Eq. 3/6.

    ``min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` with ``r = exp(logp - old_logp)``. ``old_logp`` and
    ``advantages`` are constants of the update and are detached here.

    Args:
        logp: ``[B, T]`` log-probs under the policy being trained (carries the gradient).
        old_logp: ``[B, T]`` log-probs under the behaviour policy that sampled the tokens.
        advantages: ``[B]`` (one per completion, broadcast over tokens) or ``[B, T]``.
        eps_low: lower clip range, ``r >= 1 - eps_low``.
        eps_high: upper clip range, ``r <= 1 + eps_high``; None means ``eps_low`` (the paper's single eps).

    Returns:
        ``(objective, ratio, clipped_low, clipped_high)``, all ``[B, T]``. ``clipped_low`` marks tokens where the min
        took the clipped branch because ``r < 1 - eps_low`` with ``A < 0``; ``clipped_high`` because
        ``r > 1 + eps_high`` with ``A > 0``. Those tokens get no gradient.

    Raises:
        ValueError: on mismatched shapes or negative clip ranges.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"logp and old_logp shapes differ: {tuple(logp.shape)} vs {tuple(old_logp.shape)}")
    advantages = advantages.detach()
    if advantages.dim() == 1 and logp.dim() == 2 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )

    log_ratio = (logp - old_logp.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return objective, ratio, clipped_low, clipped_high


@dataclass
class PolicyLossOutput:
    """Per-token pieces of one layer's loss; reduce ``loss`` with :func:`aggregate`."""

    loss: Tensor
    """``[B, T]`` per-token loss to MINIMISE: ``-objective + beta * kl``."""
    ratio: Tensor
    """``[B, T]`` importance ratio ``pi_theta / pi_old``."""
    kl: Tensor | None
    """``[B, T]`` k3 KL to the reference, None when no reference was given."""
    clipped_low: Tensor
    """``[B, T]`` bool: clipped at ``1 - eps_low`` with a negative advantage."""
    clipped_high: Tensor
    """``[B, T]`` bool: clipped at ``1 + eps_high`` with a positive advantage."""


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    is_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """Per-token GRPO loss of one layer: ``-min(r A, clip(r) A) + beta * k3_kl`` (the integrand of -Eq. 3/6).

    Args:
        logp: ``[B, T]`` policy log-probs (carries the gradient).
        old_logp: ``[B, T]`` behaviour log-probs.
        advantages: ``[B]`` or ``[B, T]`` advantages.
        ref_logp: ``[B, T]`` reference log-probs, or None to skip the KL term. Treated as a constant.
        beta: KL coefficient (paper: 0.001); the KL is still computed for logging when ``beta == 0``.
        eps_low: lower clip range.
        eps_high: upper clip range; None means ``eps_low``.
        is_weights: ``[B, T]`` per-token weights of the surrogate (truncated importance sampling), treated as
            constants; None means 1. The KL term is not weighted: it is a penalty on the current policy, not an
            expectation over the sampling distribution.

    Returns:
        A :class:`PolicyLossOutput`.

    Raises:
        ValueError: if ``beta`` is negative, or positive without ``ref_logp``.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs a reference: pass ref_logp, or set beta to 0 to train without KL")
    objective, ratio, clipped_low, clipped_high = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights must match logp {tuple(logp.shape)}, got {tuple(is_weights.shape)}")
        objective = objective * is_weights.detach()
    kl = None if ref_logp is None else k3_kl(logp, ref_logp.detach())
    loss = -objective if kl is None or beta == 0 else -objective + beta * kl
    return PolicyLossOutput(loss=loss, ratio=ratio, kl=kl, clipped_low=clipped_low, clipped_high=clipped_high)


def truncated_is_weights(trainer_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """``min(exp(trainer_logp - engine_logp), cap)`` per token, detached: the truncated importance weight.

    ``trainer_logp`` is the trainer's log-prob of a sampled token under the weights that sampled it and
    ``engine_logp`` the engine's own for the same token; their ratio re-weights the engine's sampling distribution to
    the trainer's. The cap bounds the variance a rare token with a tiny engine probability would add. The log-ratio
    is clamped like the PPO ratio's, so a wild pair gives ``cap``, never inf.

    Raises:
        ValueError: on a cap below 1 (it would down-weight tokens the two agree on) or mismatched shapes.
    """
    if cap < 1.0:
        raise ValueError(f"the truncated-IS cap must be >= 1, got {cap}")
    if trainer_logp.shape != engine_logp.shape:
        raise ValueError(
            f"trainer and engine log-prob shapes differ: {tuple(trainer_logp.shape)} vs {tuple(engine_logp.shape)}"
        )
    log_ratio = (trainer_logp.detach() - engine_logp.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap)


def loss_stats(out: PolicyLossOutput, mask: Tensor) -> dict[str, Tensor]:
    """Token means over ``mask`` of the clipping, ratio and KL diagnostics.

    Args:
        out: the output of :func:`policy_loss`.
        mask: ``[B, T]`` bool or 0/1 mask of the completion tokens.

    Returns:
        Detached float32 scalars ``clip_frac_low``, ``clip_frac_high``, ``clip_frac`` (either side), ``ratio_mean``
        and ``kl_mean`` (0 when there is no KL). Every value is 0 when the mask is empty.
    """
    mask = mask.bool()
    count = mask.sum().clamp_min(1).float()

    def mean(values: Tensor) -> Tensor:
        return _masked(values.detach().float(), mask).sum() / count

    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    return {
        "clip_frac_low": mean(out.clipped_low),
        "clip_frac_high": mean(out.clipped_high),
        "clip_frac": mean(out.clipped_low | out.clipped_high),
        "ratio_mean": mean(out.ratio),
        "kl_mean": zero if out.kl is None else mean(out.kl),
    }
