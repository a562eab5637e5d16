"""Micro-batch packing by token budget.

A training step's sequences have very different lengths (layer-2 queries carry the whole layer-1 answer), so
padding all of them to the longest wastes most of the forward pass. Sorting by length and filling micro-batches
up to a budget of padded tokens keeps padding small while bounding peak memory.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Group sequence indices into micro-batches whose padded size ``rows * longest`` stays within ``max_tokens``.

    A sequence longer than the budget gets a micro-batch of its own (it cannot be split). Indices inside each
    micro-batch are in descending length order; every index appears exactly once.

    Args:
        lengths: Length of each sequence.
        max_tokens: Budget of padded tokens per micro-batch.
        max_rows: Optional cap on sequences per micro-batch.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted descending, so the first index of a micro-batch is its longest.
        longest = lengths[current[0]] if current else lengths[i]
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
