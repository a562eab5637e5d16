"""Correction-layer planning: correction queries, guide phrases, selection and bookkeeping (paper Sec. 4.2).

Paper Eq. 4 builds the correction query ``q'_i = concat(q, o_i) + p_guide``. Following the paper's Table 1 the query
continues the SAME assistant turn: the chat-templated problem, then ``o_i`` without its end-of-turn token (cut before
``</think>`` for reasoning models, so the guide phrase continues the thinking), then the guide phrase. Everything
here works on token ids so the layer-1 tokens enter layer 2 exactly as they were sampled.

Selection keeps the queries whose probe correction the verifier accepted ("if errors cannot be corrected, the
data is discarded"); both originally-right and originally-wrong ``o_i`` are eligible, which is what teaches the
model not to break a correct answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: The paper's seven guide phrases (Sec. 4.2), the default pool.
DEFAULT_GUIDE_PHRASES: tuple[str, ...] = (
    "Where might I have gone wrong this time? Let me double-check carefully.",
    "Wait, let me double-check that.",
    "Wait a minute, let me make sure I didn't make a mistake.",
    "Hmm, let me think if there's another way to approach this problem.",
    "Wait, maybe I can think about it like this:",
    "Another thought: maybe I can",
    "But wait, let me just make sure I didn't miss anything in the original problem.",
)

#: The fixed turn-2 phrase of evaluation: one of the paper's pool, so every evaluation asks the same thing and draws
#: nothing from any random stream.
DEFAULT_EVAL_GUIDE = "Wait, let me double-check that."

#: The intrinsic self-correction baseline's turn-2 prompt (paper Sec. 5, after Huang et al. 2023).
INTRINSIC_SELF_CORRECTION_PROMPT = (
    "The solution above may contain errors due to a misunderstanding of the question. Please identify and correct "
    "any mistakes, then rewrite the solution clearly and accurately."
)


class GuidePool:
    """A pool of guide phrases sampled uniformly at random, so the model cannot overfit one template.

    Args:
        phrases: The pool; empty pools and blank phrases are rejected.
    """

    def __init__(self, phrases: Sequence[str] = DEFAULT_GUIDE_PHRASES) -> None:
        phrases = tuple(phrases)
        if not phrases:
            raise ValueError("the guide-phrase pool is empty: give at least one phrase (--data.rollout.guide_phrases)")
        blank = [i for i, p in enumerate(phrases) if not p.strip()]
        if blank:
            raise ValueError(f"guide phrases at positions {blank} are blank (--data.rollout.guide_phrases)")
        self.phrases = phrases

    def __len__(self) -> int:
        return len(self.phrases)

    def sample(self, k: int, generator: torch.Generator | None = None) -> list[int]:
        """Indices of ``k`` phrases drawn with replacement."""
        return torch.randint(len(self.phrases), (k,), generator=generator).tolist()


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Index of the first occurrence of ``needle`` in ``haystack``, or -1."""
    n = len(needle)
    if n == 0:
        return -1
    for i in range(len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def continuation_body(
    completion_ids: Sequence[int], end_ids: Sequence[int], think_close_ids: Sequence[int] = ()
) -> list[int]:
    """The part of a layer-1 completion that the layer-2 query keeps.

    Trailing end-of-turn tokens are dropped (the turn must stay open) and, when ``think_close_ids`` occurs, the
    completion is cut before it so the guide phrase lands inside the thinking block.
    """
    body = list(completion_ids)
    while body and body[-1] in end_ids:
        body.pop()
    cut = _find(body, think_close_ids)
    return body[:cut] if cut >= 0 else body


def build_correction_query(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    guide_ids: Sequence[int],
    end_ids: Sequence[int],
    think_close_ids: Sequence[int] = (),
) -> list[int]:
    """Token ids of ``q ⊕ o ⊕ p_guide`` (paper Eq. 4) continuing the assistant turn."""
    return [*prompt_ids, *continuation_body(completion_ids, end_ids, think_close_ids), *guide_ids]


def select_verified(probe_rewards: Tensor, threshold: float = 1.0) -> Tensor:
    """Indices of the queries whose probe correction verified. [N] float -> [K] long, K <= N."""
    return (probe_rewards >= threshold).nonzero().flatten()


def problem_of(candidates: Tensor, owners: int | Tensor) -> Tensor:
    """The problem of each candidate query index: ``index // G`` for layer 2's prompt-major candidates (``owners`` is
    G), or ``owners[index]`` for a deeper layer's (``owners`` is every candidate's problem)."""
    candidates = candidates.long()
    if isinstance(owners, int):
        return candidates // owners
    return owners.long()[candidates]


def cap_per_problem(
    kept: Tensor, owners: int | Tensor, cap: int, generators: Sequence[torch.Generator | None] | torch.Generator | None
) -> Tensor:
    """At most ``cap`` of each problem's kept query indices, drawn uniformly without replacement.

    A uniform draw keeps a correction layer's training data an unbiased sample of the paper's (the same mix of queries
    that were right and wrong the turn before, in expectation); it only bounds how many groups a problem adds.

    Args:
        kept: [K] ascending indices among the candidate queries, as ``select_verified`` returns.
        owners: G when the candidates are the B*G layer-1 samples (prompt-major, so ``index // G`` is the problem),
            else a [N] tensor with every candidate's problem.
        cap: Most indices kept per problem (>= 1).
        generators: One generator for the whole draw, or one per problem (indexed by the problem, so a problem's
            draw does not depend on the rest of the batch); None draws from torch's global generator.

    Returns:
        [K'] ascending indices, a subset of ``kept``.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    kept = kept.long()
    owner = problem_of(kept, owners)
    chosen = []
    for problem in torch.unique(owner).tolist():
        mine = kept[owner == problem]
        if mine.numel() > cap:
            generator = generators[problem] if isinstance(generators, Sequence) else generators
            mine = mine[torch.randperm(mine.numel(), generator=generator)[:cap]]
        chosen.append(mine)
    return torch.sort(torch.cat(chosen)).values if chosen else kept


@dataclass(frozen=True)
class CorrectionPlan:
    """Maps every kept group of a correction layer back to its query among the candidates, and to its problem.

    Attributes:
        query_index: [K] index of the kept query among the candidates (the previous layer's rows).
        problem_index: [K] index of its problem in the batch.
    """

    query_index: Tensor
    problem_index: Tensor

    @classmethod
    def from_selection(cls, kept: Tensor, owners: int | Tensor) -> CorrectionPlan:
        """``owners`` as in ``cap_per_problem``: G for layer 2, or every candidate's problem."""
        kept = kept.long()
        return cls(query_index=kept, problem_index=problem_of(kept, owners))

    def __len__(self) -> int:
        return int(self.query_index.numel())

    def kept_per_problem(self, num_problems: int) -> Tensor:
        """[B] long: G' of each problem (kept queries)."""
        return torch.bincount(self.problem_index, minlength=num_problems)


#: The readings of turn 2 (``RolloutConfig.turn2_scoring``): see ``turn2_texts``.
TURN2_SCORINGS: tuple[str, ...] = ("final", "correction", "full")


def turn2_texts(
    first: Sequence[str],
    guides: Sequence[str],
    corrections: Sequence[str],
    mode: str,
    states_answer: Callable[[str], bool],
    separator: str = "\n\n",
) -> tuple[list[str], list[bool]]:
    """The texts turn 2 is judged on, and which of them keep turn 1's answer.

    Args:
        first: Turn-1 texts ``o``, one per query.
        guides: The guide phrase of each query.
        corrections: Turn-2 texts (the corrections), one per query.
        mode: ``final``: the answer the model ends with, i.e. the correction where it states an answer and turn 1's
            text otherwise (a correction that only affirms keeps turn 1's answer); ``correction``: the correction
            alone; ``full``: ``o ⊕ separator ⊕ guide ⊕ " " ⊕ correction`` as one text.
        states_answer: Whether a text states a final answer (``final`` only), as the reward reads answers.
        separator: What joins ``o`` and the guide in the query.

    Returns:
        ``(texts, kept_turn1)``: the text to score per query, and True where it is turn 1's (``final`` only).
    """
    if not len(first) == len(guides) == len(corrections):
        raise ValueError(f"{len(first)} turn-1 texts, {len(guides)} guides and {len(corrections)} corrections")
    if mode == "correction":
        return list(corrections), [False] * len(corrections)
    if mode == "full":
        return [f"{o}{separator}{g} {c}" for o, g, c in zip(first, guides, corrections)], [False] * len(corrections)
    if mode not in TURN2_SCORINGS:
        raise ValueError(f"turn-2 scoring must be one of {', '.join(TURN2_SCORINGS)}, got {mode!r}")
    kept = [not states_answer(c) for c in corrections]
    return [o if keep else c for o, c, keep in zip(first, corrections, kept)], kept
