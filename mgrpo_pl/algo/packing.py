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


def pack_shared_prefix(
    prefix_ids: Sequence[int], prefix_lengths: Sequence[int], suffix_lengths: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """Group rows into micro-batches for a prefix-sharing forward, where rows with the same prefix id run it once.

    GRPO's G samples of a problem share its prompt, and MGRPO's H layer-2 samples share their whole correction query
    (which is most of each sequence): computing a shared prefix once per micro-batch instead of once per row removes
    that much of the forward and backward work. A micro-batch's cost is what is computed:
    ``distinct prefixes * longest prefix + rows * longest suffix``, kept within ``max_tokens``.

    Rows of one prefix are kept together (longest suffix first) and groups are taken longest first, so a group is
    split only when it alone exceeds the budget (each part then recomputes the prefix; a row whose own cost exceeds the
    budget gets a micro-batch of its own). Every index appears exactly once.

    Args:
        prefix_ids: For each row, an id shared by exactly the rows with an identical prefix.
        prefix_lengths: For each row, the length of its prefix (equal within an id).
        suffix_lengths: For each row, the length of the part computed per row.
        max_tokens: Budget of computed (padded) tokens per micro-batch.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not len(prefix_ids) == len(prefix_lengths) == len(suffix_lengths):
        raise ValueError("prefix_ids, prefix_lengths and suffix_lengths must have the same length")
    groups: dict[int, list[int]] = {}
    for i, pid in enumerate(prefix_ids):
        groups.setdefault(pid, []).append(i)
    for rows in groups.values():
        rows.sort(key=lambda i: -suffix_lengths[i])
    # Longest group first (prefix plus its longest suffix); ties by first row index, so the result is deterministic.
    ordered = sorted(groups.values(), key=lambda rows: (-(prefix_lengths[rows[0]] + suffix_lengths[rows[0]]), rows[0]))
    batches: list[list[int]] = []
    current: list[int] = []
    seen: set[int] = set()
    longest_prefix = longest_suffix = 0
    for rows in ordered:
        for i in rows:
            new_prefix = prefix_ids[i] not in seen
            prefix = max(longest_prefix, prefix_lengths[i])
            suffix = max(longest_suffix, suffix_lengths[i])
            cost = (len(seen) + new_prefix) * prefix + (len(current) + 1) * suffix
            if current and cost > max_tokens:
                batches.append(current)
                current, seen = [], set()
                prefix, suffix = prefix_lengths[i], suffix_lengths[i]
            current.append(i)
            seen.add(prefix_ids[i])
            longest_prefix, longest_suffix = prefix, suffix
    if current:
        batches.append(current)
    return batches
