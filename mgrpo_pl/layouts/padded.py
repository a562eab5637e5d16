"""The plain training layout: one left-padded row per sequence, micro-batches packed by token budget.

Sequences are LEFT-padded so every completion ends in the last column: the model then needs logits only for the
last ``max completion length + 1`` positions (``logits_to_keep``), not for the prompt, which for layer-2 queries is
most of the sequence. Position ids are passed explicitly because left padding would otherwise shift them away
from the positions used at generation time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mgrpo_pl.rollout.types import RolloutBatch


@dataclass
class MicroBatch:
    """Padded tensors for one forward pass. R rows, L columns, K = completion columns kept.

    Attributes:
        input_ids: [R, L] long, left-padded.
        attention_mask: [R, L] long.
        position_ids: [R, L] long.
        targets: [R, K] long, the tokens whose log-probs are trained (the last K columns of input_ids).
        mask: [R, K] bool, True on completion tokens that enter the loss.
        advantages: [R] float.
        layer: [R] long.
        engine_logprobs: [R, K] float behaviour log-probs aligned with ``targets`` (0 where absent), or None.
        logits_to_keep: K + 1, the number of trailing positions whose logits are needed.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    layer: Tensor
    engine_logprobs: Tensor | None
    logits_to_keep: int


def collate_micro_batch(batch: RolloutBatch, rows: list[int], pad_id: int, mask_truncated: bool) -> MicroBatch:
    """Left-pad the chosen sequences of ``batch`` into one ``MicroBatch`` (on the batch's device)."""
    seqs = [batch.sequences[i] for i in rows]
    device = seqs[0].device
    width = max(len(s) for s in seqs)
    comp = [len(batch.sequences[i]) - int(batch.prompt_lengths[i]) for i in rows]
    keep = max(max(comp), 1)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), keep), dtype=torch.bool, device=device)
    engine_lp = torch.zeros((len(rows), keep), device=device) if batch.engine_logprobs is not None else None
    for r, (i, seq) in enumerate(zip(rows, seqs)):
        input_ids[r, width - len(seq) :] = seq
        attention[r, width - len(seq) :] = 1
        if comp[r] and not (mask_truncated and bool(batch.truncated[i])):
            mask[r, keep - comp[r] :] = True
        if engine_lp is not None and comp[r]:
            engine_lp[r, keep - comp[r] :] = batch.engine_logprobs[i][: comp[r]].to(device)  # type: ignore[index]
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    index = torch.tensor(rows, device=batch.advantages.device)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        targets=input_ids[:, width - keep :],
        mask=mask,
        advantages=batch.advantages[index],
        layer=batch.layer[index],
        engine_logprobs=engine_lp,
        logits_to_keep=keep + 1,
    )
