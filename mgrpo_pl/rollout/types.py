"""Typed data that flows from generation to the loss.

``Generation`` is what an engine returns; ``RolloutBatch`` is what the training step consumes; ``EvalBatch`` is what
the two-turn evaluation hands to ``validation_step`` / ``test_step``. Sequences stay ragged (one 1-D tensor per
sequence) so the module can pack micro-batches by token budget instead of padding everything to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    """Sampling parameters shared by every engine.

    Attributes:
        max_new_tokens: Longest completion, in tokens; longer ones are cut and marked unfinished.
        temperature: Softmax temperature; 0 means greedy decoding.
        top_p: Nucleus sampling mass (1.0 = off).
        top_k: Keep the k most likely tokens (0 = off).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_overrides(self, **changes: object) -> SamplingConfig:
        return replace(self, **changes)


@dataclass
class Generation:
    """N completions from one engine call, prompt-major (prompt 0's n samples first).

    Attributes:
        token_ids: Completion token ids per sequence, including the end-of-turn token when one was emitted.
        texts: Decoded completions without special tokens.
        finished: True when the sequence ended with an end token, False when cut at ``max_new_tokens``.
        logprobs: Behaviour log-probs of each completion token at the sampling temperature, when the engine
            reports them (used for logging the trainer/engine mismatch), else None.
    """

    token_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def _move(value: object, device: torch.device | str) -> object:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list) and value and isinstance(value[0], Tensor):
        return [v.to(device) for v in value]
    return value


@dataclass
class RolloutBatch:
    """Everything the loss needs for one training step, both layers together.

    Shapes: N sequences in total (layer-1 ones first, then layer-2 ones).

    Attributes:
        sequences: N 1-D long tensors, prompt (or layer-2 query) followed by the completion.
        prompt_lengths: [N] long, number of leading tokens of each sequence that are context, not trained.
        advantages: [N] float32, the group-relative advantage of each completion.
        layer: [N] long, the layer of each row (1 ... ``num_layers``).
        truncated: [N] bool, completion was cut at the length limit.
        engine_logprobs: N 1-D float tensors (completion tokens only) from the engine, or None.
        rewards: [N] float32 reward of each completion.
        num_problems: Problems in the step (B).
        correct_t1: [B*G] bool, layer-1 sample correct (turn 1), for the transition metrics.
        correct_t2: [B*G] bool, its probe correction correct (turn 2); empty when layer 2 is off.
        stats: Scalar statistics of the rollout for logging (rewards, G', tokens, timings).
        samples: A few decoded examples for the completions logger.
        weights_checksum: Checksum of the engine weights that generated this batch (on-policy checks); None when the
            engine generates with the policy module itself (``TransformersEngine(share_weights=True)``).
        num_layers: The layers the rollout was configured with (N), the same on every rank, whether or not each
            layer kept a row: the loss's per-layer terms and statistics are keyed by it.
    """

    sequences: list[Tensor]
    prompt_lengths: Tensor
    advantages: Tensor
    layer: Tensor
    truncated: Tensor
    rewards: Tensor
    num_problems: int
    correct_t1: Tensor
    correct_t2: Tensor
    engine_logprobs: list[Tensor] | None = None
    stats: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, object]] = field(default_factory=list)
    weights_checksum: float | None = None
    num_layers: int = 2

    def __len__(self) -> int:
        return len(self.sequences)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Lightning moves any object with a ``to`` method; ragged lists move element-wise."""
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    @property
    def completion_lengths(self) -> Tensor:
        lengths = torch.tensor([len(s) for s in self.sequences], dtype=torch.long)
        return lengths - self.prompt_lengths.cpu()


@dataclass
class EvalBatch:
    """Two-turn evaluation results for a batch of problems (one row per problem and sample).

    Attributes:
        problem_ids: Id of each row's problem.
        correct_t1: [M] bool, turn-1 answer correct.
        correct_t2: [M] bool, turn-2 (self-corrected) answer correct.
        records: One dict per row (problem, answer, every turn's text and correctness) for the JSONL report.
        correct_later: [M] bool per turn after the second (turns 3..N of an ``eval_turns`` N evaluation).
    """

    problem_ids: list[str]
    correct_t1: Tensor
    correct_t2: Tensor
    records: list[dict[str, object]]
    correct_later: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problem_ids)

    def to(self, device: torch.device | str) -> EvalBatch:
        return replace(
            self,
            correct_t1=self.correct_t1.to(device),
            correct_t2=self.correct_t2.to(device),
            correct_later=[c.to(device) for c in self.correct_later],
        )

    @property
    def correct(self) -> list[Tensor]:
        """Every turn's correctness, turn 1 first."""
        return [self.correct_t1, self.correct_t2, *self.correct_later]
