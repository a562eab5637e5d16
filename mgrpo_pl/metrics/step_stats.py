"""What a training step logs about its loss: sums accumulated over micro-batches, then the step's values.

Token statistics are summed weighted by each micro-batch's trained tokens and divided by the step's total at the end,
so the logged means are over the step's tokens whatever the micro-batching. Under data parallelism the sums are
reduced across ranks first (``distributed.global_sums``).
"""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor

from mgrpo_pl.algo.losses import loss_stats
from mgrpo_pl.layouts import AnyMicroBatch
from mgrpo_pl.method.loss import MicroBatchLoss


class StepSums:
    """Per-step sums of one rank's micro-batches: per-layer losses, token-weighted loss terms, trained tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(
        self, result: MicroBatchLoss, logp: Tensor, mb: AnyMicroBatch, counted: bool, tis_cap: float | None
    ) -> None:
        """Add one micro-batch; ``counted`` is False for the empty passes that only keep sharded ranks in step."""
        for layer, part in result.parts.items():
            self.sums[f"loss/layer{layer}"] += float(part.detach())
        if not counted:
            return
        sums, mask = self.sums, mb.mask
        tokens = float(mask.sum())
        for key, value in loss_stats(result.terms, mask).items():
            sums[key] += float(value) * tokens
        if mb.engine_logprobs is not None and tokens:
            sums["engine_logprob_gap"] += float((logp.detach() - mb.engine_logprobs).abs()[mask].sum())
        if result.is_weights is not None and tokens:
            sums["tis_weight"] += float(result.is_weights[mask].sum())
            sums["tis_capped"] += float((result.is_weights[mask] >= tis_cap).sum())
        sums["tokens"] += tokens


def step_values(
    sums: dict[str, float], layer_weights: dict[int, float], engine_logprobs: bool, tis: bool
) -> tuple[float, dict[str, float]]:
    """The step's loss (``Σ_k w_k · L_k``) and its ``train/`` values from the (global) sums."""
    tokens = max(sums["tokens"], 1.0)
    loss = 0.0
    for layer, weight in layer_weights.items():
        loss += weight * sums[f"loss/layer{layer}"]
    values = {"train/loss": loss}
    values.update({f"train/loss_layer{layer}": sums[f"loss/layer{layer}"] for layer in layer_weights})
    values.update(
        {
            "train/kl": sums["kl_mean"] / tokens,
            "train/clip_frac": sums["clip_frac"] / tokens,
            "train/clip_frac_low": sums["clip_frac_low"] / tokens,
            "train/clip_frac_high": sums["clip_frac_high"] / tokens,
            "train/ratio": sums["ratio_mean"] / tokens,
            "train/trained_tokens": sums["tokens"],
        }
    )
    if engine_logprobs:
        values["train/engine_logprob_gap"] = sums["engine_logprob_gap"] / tokens
    if tis:
        values["train/tis_weight"] = sums["tis_weight"] / tokens
        values["train/tis_capped_frac"] = sums["tis_capped"] / tokens
    return loss, values
