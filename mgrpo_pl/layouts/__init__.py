"""Training layouts: how one step's ``RolloutBatch`` is cut into forward passes, and their log-probs.

Three layouts give the same loss and gradient, with less computed the further down the list:

- ``padded``: one left-padded row per sequence, packed by token budget;
- ``shared_prefix``: each distinct prompt or correction query once per micro-batch, its rows on its key/value cache;
- ``prefix_tree``: a layer-2 group on top of the keys and values of the layer-1 row its query repeats.

``micro_batch_layout`` plans a step (``packing`` balances the passes) and returns the collate function that builds
each micro-batch; ``completion_logprobs`` runs a micro-batch of any layout. The module calls only these two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mgrpo_pl.algo.logprobs import token_logprobs
from mgrpo_pl.layouts.packing import balanced, pack_by_token_budget, padded_cost
from mgrpo_pl.layouts.padded import MicroBatch, collate_micro_batch
from mgrpo_pl.layouts.prefix_tree import (
    ContinuedMicroBatch,
    collate_prefix_tree,
    continued_logits,
    pad_columns,
    prefix_tree_plan,
)
from mgrpo_pl.layouts.shared_prefix import (
    SharedPrefixMicroBatch,
    collate_shared_prefix,
    completion_logits,
    shared_prefix_plan,
)
from mgrpo_pl.rollout.types import RolloutBatch

AnyMicroBatch = MicroBatch | SharedPrefixMicroBatch | ContinuedMicroBatch
Collate = Callable[[RolloutBatch, list[int], int, bool], AnyMicroBatch]


# Precisions whose forwards run in full precision; under the others the shared-prefix layout is not used on CUDA.
FULL_PRECISIONS = ("32-true", "32", "64-true", "64")


def shared_prefix_allowed(hparams: Any, sharded: bool, device_type: str, precision: str) -> bool:
    """Whether a step may use the shared-prefix layout (``collate_shared_prefix``) rather than the plain one."""
    if not hparams.shared_prefix or hparams.gradient_checkpointing or sharded:
        return False
    # Measured on an H100 (bf16-mixed, 360M Qwen2, real MGRPO batches): the shared-prefix layout gave NaN gradients
    # at the first step while the plain layout, and both layouts in fp32, stayed finite. scripts/gpu_check.py's
    # layout check on synthetic batches passes, so the cause is not found yet; until it is, half precision on a
    # GPU trains in the plain layout; so does a half-precision reference there (not measured; the same caution).
    half_reference = getattr(hparams, "reference_dtype", None) in ("bfloat16", "float16")
    return device_type != "cuda" or (precision in FULL_PRECISIONS and not half_reference)


def micro_batch_layout(
    batch: RolloutBatch, max_tokens: int, shared: bool, tree: bool
) -> tuple[list[list[int]], Collate]:
    """A step's micro-batches (row indices) and the collate function that builds them: the prefix tree (``shared``
    and ``tree``), plain prefix sharing (``shared``), or, where sharing is off or cannot apply, the left-padded
    layout packed by token budget. Every plan is ``balanced``: no more passes or computed tokens than the greedy
    packing at ``max_tokens``, with the largest pass smaller where a smaller budget allows it."""
    if shared:
        plan = prefix_tree_plan(batch, max_tokens) if tree else shared_prefix_plan(batch, max_tokens)
        if plan is not None:
            return plan, collate_prefix_tree if tree else collate_shared_prefix
    lengths = [len(s) for s in batch.sequences]
    plan = balanced(lambda budget: pack_by_token_budget(lengths, budget), padded_cost(lengths), max_tokens)
    return plan, collate_micro_batch


def computed_tokens(mb: AnyMicroBatch) -> int:
    """Positions a micro-batch's forward runs, padding included: what the packers' cost models count."""
    if isinstance(mb, ContinuedMicroBatch):
        return computed_tokens(mb.base) + mb.extra_ids.numel() + mb.input_ids.numel()
    if isinstance(mb, SharedPrefixMicroBatch):
        return mb.prefix_ids.numel() + mb.input_ids.numel()
    return mb.input_ids.numel()


def completion_logprobs(model: nn.Module, mb: AnyMicroBatch, temperature: float = 1.0) -> Tensor:
    """[R, K] log-probs of the micro-batch's completion tokens, aligned with ``mb.targets``, in any layout."""
    if not isinstance(mb, ContinuedMicroBatch):
        return token_logprobs(completion_logits(model, mb), mb.targets, temperature=temperature)
    base_logits, logits = continued_logits(model, mb)
    keep = mb.targets.shape[1]
    base = token_logprobs(base_logits, mb.base.targets, temperature=temperature)
    continued = token_logprobs(logits, mb.continued_targets, temperature=temperature)
    return torch.cat([pad_columns(base, keep), pad_columns(continued, keep)])
