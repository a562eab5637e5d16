"""What one layer of a training step hands to the loss, and how the layers become one ``RolloutBatch``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mgrpo_pl.rollout.types import RolloutBatch


@dataclass
class LayerRows:
    """One layer's trained rows, one GRPO group after another: row ``i`` is ``queries[i] ⊕ completions[i]``.

    Layer 1's queries are the problems' prompts; layer k+1's are ``layer-k query ⊕ its completion ⊕ guide phrase``,
    built from these rows (``owners`` and ``judged`` carry what the next layer needs).
    """

    layer: int
    queries: list[list[int]]
    completions: list[list[int]]
    finished: list[bool]
    rewards: Tensor
    advantages: Tensor
    logprobs: list[list[float]] | None = None
    owners: list[int] = field(default_factory=list)  # each row's problem in the batch
    judged: list[str] = field(default_factory=list)  # the text each row's reward read (its turn's answer)

    def __len__(self) -> int:
        return len(self.queries)


@dataclass
class StepRecord:
    """What a step's rollout measured besides its rows: turn-1/turn-2 correctness, statistics, example samples."""

    correct_t1: Tensor
    correct_t2: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    stats: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, object]] = field(default_factory=list)


def to_batch(
    layers: list[LayerRows], record: StepRecord, num_problems: int, checksum: float | None, num_layers: int = 2
) -> RolloutBatch:
    """The layers' rows in order (layer 1 first), as the tensors the training step consumes.

    Behaviour log-probs are kept only when every layer has them: the loss compares whole rows.
    """
    rows = [(layer, q, c, f) for rows in layers for layer, q, c, f in _rows(rows)]
    logprobs = None
    if all(rows.logprobs is not None for rows in layers):
        logprobs = [torch.tensor(lp) for rows in layers for lp in rows.logprobs]  # type: ignore[union-attr]
    return RolloutBatch(
        sequences=[torch.tensor(q + c) for _, q, c, _ in rows],
        prompt_lengths=torch.tensor([len(q) for _, q, _, _ in rows], dtype=torch.long),
        advantages=torch.cat([rows.advantages for rows in layers]).float(),
        layer=torch.tensor([layer for layer, _, _, _ in rows], dtype=torch.long),
        truncated=torch.tensor([not f for _, _, _, f in rows], dtype=torch.bool),
        rewards=torch.cat([rows.rewards for rows in layers]).float(),
        num_problems=num_problems,
        correct_t1=record.correct_t1,
        correct_t2=record.correct_t2,
        engine_logprobs=logprobs,
        stats=record.stats,
        samples=record.samples,
        weights_checksum=checksum,
        num_layers=num_layers,
    )


def _rows(rows: LayerRows) -> list[tuple[int, list[int], list[int], bool]]:
    return [(rows.layer, q, c, f) for q, c, f in zip(rows.queries, rows.completions, rows.finished, strict=True)]
