"""A step's loss: the sum over layers of each layer's GRPO loss times its weight (paper Eq. 3 and Eq. 6).

``L = Σ_k w_k · L_k`` over layers k = 1..N with ``w_1 = 1`` and ``w_k`` from ``--model.loss.layer_weights`` (default
``layer2_weight``). Each ``L_k`` is the PPO-clipped surrogate with
the k3 KL to the reference (``algo.losses.policy_loss``), aggregated over layer k's completions by name (default: the
paper's mean over a completion's tokens, then mean over completions).

A step runs in micro-batches, so every micro-batch divides by the WHOLE batch's per-layer counts (``layer_counts``):
the micro-batch losses then sum to the full-batch loss whatever the token budget or layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mgrpo_pl.algo.losses import PolicyLossOutput, aggregate, policy_loss, truncated_is_weights
from mgrpo_pl.layouts import AnyMicroBatch
from mgrpo_pl.rollout.types import RolloutBatch

LayerCounts = dict[int, tuple[float, float]]


@dataclass(frozen=True)
class LossTerms:
    """What the loss of one micro-batch needs besides its log-probs.

    Attributes:
        layer_weights: ``{layer: w_k}``; a layer absent from the batch adds nothing.
        beta: Weight of the k3 KL to the reference.
        clip_eps: PPO clip epsilon (lower side, and upper side unless ``clip_eps_high`` is set).
        clip_eps_high: Upper clip epsilon (DAPO's clip-higher); None uses ``clip_eps``.
        aggregation: How token losses become one number per layer (a ``LOSS_AGGREGATIONS`` name).
        tis_cap: Truncated importance-sampling cap on ``pi_trainer / pi_engine``; None leaves tokens unweighted.
    """

    layer_weights: dict[int, float]
    beta: float
    clip_eps: float
    clip_eps_high: float | None
    aggregation: str
    tis_cap: float | None = None


@dataclass
class MicroBatchLoss:
    """One micro-batch's weighted loss, each layer's part of it, and the per-token terms behind them."""

    loss: Tensor
    parts: dict[int, Tensor]
    terms: PolicyLossOutput
    is_weights: Tensor | None


def loss_layers(num_layers: int) -> range:
    """The layers a step's loss and statistics are keyed by: 1..N, and layer 2 even when N = 1 (its terms are then
    0), so one-round GRPO logs what it always has."""
    return range(1, max(2, num_layers) + 1)


def layer_counts(batch: RolloutBatch, mask_truncated: bool) -> LayerCounts:
    """Per layer: (completions with at least one trained token, trained tokens) over the whole batch.

    Every layer of ``loss_layers(batch.num_layers)`` has an entry, rows or not, so all ranks reduce the same keys.
    """
    lengths = batch.completion_lengths
    if mask_truncated:
        lengths = lengths * (~batch.truncated.cpu()).long()
    out = {}
    for layer in loss_layers(batch.num_layers):
        sel = batch.layer.cpu() == layer
        out[layer] = (float((lengths[sel] > 0).sum()), float(lengths[sel].sum()))
    return out


def micro_batch_loss(
    logp: Tensor,
    ref_logp: Tensor | None,
    mb: AnyMicroBatch,
    terms: LossTerms,
    counts: LayerCounts,
    norm_length: int,
) -> MicroBatchLoss:
    """``Σ_k w_k · L_k`` over this micro-batch's rows, each layer's part normalised by the whole batch's ``counts``.

    ``old_logp`` is ``logp`` detached: every rollout batch gets exactly one optimizer step, so the ratio is 1 and the
    surrogate's gradient is the policy gradient.
    """
    is_weights = None
    if terms.tis_cap is not None:
        is_weights = truncated_is_weights(logp, mb.engine_logprobs, terms.tis_cap)
    out = policy_loss(
        logp,
        logp.detach(),
        mb.advantages,
        ref_logp=ref_logp,
        beta=terms.beta,
        eps_low=terms.clip_eps,
        eps_high=terms.clip_eps_high,
        is_weights=is_weights,
    )
    # A zero still connected to the graph: backward must run even when no row of the whole batch is trained (every
    # completion empty, or cut under mask_truncated); masked positions cannot leak a NaN into it.
    loss = torch.where(mb.mask, logp, torch.zeros_like(logp)).sum() * 0.0
    parts: dict[int, Tensor] = {}
    for layer, weight in terms.layer_weights.items():
        num_seqs, num_tokens = counts[layer]
        if num_seqs == 0:
            continue
        layer_mask = mb.mask & (mb.layer == layer)[:, None]
        parts[layer] = aggregate(
            out.loss,
            layer_mask,
            terms.aggregation,
            num_seqs=num_seqs,
            num_tokens=num_tokens,
            norm_length=norm_length,
        )
        loss = loss + weight * parts[layer]
    return MicroBatchLoss(loss, parts, out, is_weights)
