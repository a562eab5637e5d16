"""Micro-batch packing by token budget.

A training step's sequences have very different lengths (layer-2 queries carry the whole layer-1 answer), so
padding all of them to the longest wastes most of the forward pass. Sorting by length and filling micro-batches
up to a budget of padded tokens keeps padding small while bounding peak memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


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


def padded_cost(lengths: Sequence[int]) -> Callable[[list[int]], int]:
    """The computed tokens of a left-padded micro-batch: rows times the longest row."""
    return lambda rows: len(rows) * max(lengths[i] for i in rows)


def shared_prefix_cost(
    prefix_ids: Sequence[int], prefix_lengths: Sequence[int], suffix_lengths: Sequence[int]
) -> Callable[[list[int]], int]:
    """The computed tokens of a prefix-sharing micro-batch (see ``pack_shared_prefix``)."""

    def cost(rows: list[int]) -> int:
        distinct = len({prefix_ids[i] for i in rows})
        return distinct * max(prefix_lengths[i] for i in rows) + len(rows) * max(suffix_lengths[i] for i in rows)

    return cost


BALANCE_STEPS = 16  # budgets tried above the tightest one that keeps the number of passes


def balanced(
    pack: Callable[[int], list[list[int]]], cost: Callable[[list[int]], int], max_tokens: int
) -> list[list[int]]:
    """``pack(max_tokens)``'s micro-batches, re-packed at a smaller budget where that needs no more of them, computes
    no more tokens in all and makes the largest smaller; else ``pack(max_tokens)`` itself.

    A greedy packer fills micro-batches to the budget and leaves the rest to the last one (a GRPO step's 2,246
    computed tokens at 1,024 went into 962, 995 and 289). A step's activation memory peaks in its largest
    micro-batch, so the same passes with the largest made smaller (770, 770, 706) lower peak memory at the same
    work. The number of passes falls as the budget grows, so bisection finds the tightest budget that keeps it; the
    computed tokens do not move monotonically (a larger budget can split a group where a smaller one did not), so
    ``BALANCE_STEPS`` evenly spaced budgets from there up to ``max_tokens`` are tried as well and the plan with the
    smallest largest micro-batch among those that keep both counts is taken. It is never worse than the greedy one.
    """
    best = pack(max_tokens)
    if len(best) < 2:
        return best
    costs = [cost(rows) for rows in best]
    count, total, largest = len(best), sum(costs), max(costs)
    if largest > max_tokens:  # a row over the budget alone: it stays the largest pass whatever the budget
        return best
    lo, hi = math.ceil(total / count), max_tokens
    while lo < hi:  # the smallest budget with no more passes
        mid = (lo + hi) // 2
        if len(pack(mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    step = max(1, (max_tokens - lo) // BALANCE_STEPS)
    for budget in range(lo, largest, step):
        plan = pack(budget)
        costs = [cost(rows) for rows in plan]
        if len(plan) <= count and sum(costs) <= total and max(costs) < largest:
            best, largest = plan, max(costs)
    return best


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


@dataclass
class _Fill:
    """What a prefix-tree micro-batch computes: ``roots * root_prefix + root_rows * root_suffix`` for the groups
    whose prefix it runs, plus ``groups * extra + group_rows * group_suffix`` for the groups that continue a row."""

    roots: int = 0
    root_rows: int = 0
    root_prefix: int = 0
    root_suffix: int = 0
    groups: int = 0
    group_rows: int = 0
    extra: int = 0
    group_suffix: int = 0

    def cost(self) -> int:
        return (
            self.roots * self.root_prefix
            + self.root_rows * self.root_suffix
            + self.groups * self.extra
            + self.group_rows * self.group_suffix
        )

    def merge(self, other: _Fill) -> _Fill:
        return _Fill(
            self.roots + other.roots,
            self.root_rows + other.root_rows,
            max(self.root_prefix, other.root_prefix),
            max(self.root_suffix, other.root_suffix),
            self.groups + other.groups,
            self.group_rows + other.group_rows,
            max(self.extra, other.extra),
            max(self.group_suffix, other.group_suffix),
        )


def prefix_tree_cost(
    prefix_ids: Sequence[int],
    prefix_lengths: Sequence[int],
    suffix_lengths: Sequence[int],
    parents: Sequence[int],
    extra_lengths: Sequence[int],
) -> Callable[[list[int]], int]:
    """The computed tokens of a prefix-tree micro-batch (see ``pack_prefix_trees``): a row whose parent is in the
    micro-batch continues it, any other row runs its whole prefix.

    Exact for the micro-batches ``pack_prefix_trees`` makes, where a layer-2 row is either with its parent or in a
    micro-batch without layer-1 rows. Elsewhere ``collate_prefix_tree`` may continue a row from a sibling of its
    parent (same prompt) and compute more or fewer tokens than counted here."""

    def cost(rows: list[int]) -> int:
        present = set(rows)
        fill = _Fill()
        roots: set[int] = set()
        groups: set[int] = set()
        for i in rows:
            if parents[i] >= 0 and parents[i] in present:
                groups.add(prefix_ids[i])
                part = _Fill(group_rows=1, extra=extra_lengths[i], group_suffix=suffix_lengths[i])
            else:
                roots.add(prefix_ids[i])
                part = _Fill(root_rows=1, root_prefix=prefix_lengths[i], root_suffix=suffix_lengths[i])
            fill = fill.merge(part)
        return dataclasses.replace(fill, roots=len(roots), groups=len(groups)).cost()

    return cost


def pack_prefix_trees(
    prefix_ids: Sequence[int],
    prefix_lengths: Sequence[int],
    suffix_lengths: Sequence[int],
    parents: Sequence[int],
    extra_lengths: Sequence[int],
    max_tokens: int,
) -> list[list[int]]:
    """Like ``pack_shared_prefix``, but a group whose prefix continues another row's computed tokens is packed with
    that row where the budget allows, so that it computes only the ``extra`` tokens past them.

    MGRPO's layer-2 query is the layer-1 sequence it corrects plus a guide phrase: with the layer-1 row in the same
    micro-batch, a layer-2 group runs the guide phrase on top of that row's key/value cache instead of the whole
    query. A family is a root row (one without a parent) with the groups that continue it. Root groups are taken
    longest first and their rows one by one, those with the most children first; a family goes whole into the
    current micro-batch if it fits, else into a new one (so a root group is split where needed: that repeats its
    prefix, which for MGRPO's prompt costs less than repeating the layer-1 sequence in each query). The children of
    a family too big for the budget alone that do not fit with it, and children whose parent has a parent, are
    packed by ``pack_shared_prefix`` as plain groups. Every index appears exactly once.

    Args:
        prefix_ids, prefix_lengths, suffix_lengths: as for ``pack_shared_prefix`` (the prefix is the whole one, used
            when a group is packed without its parent).
        parents: For each row, the row whose computed tokens its prefix continues, or -1; equal within a prefix id,
            and a parent's own parent is -1.
        extra_lengths: For each row with a parent, its prefix tokens past the parent's (equal within a prefix id).
        max_tokens: Budget of computed (padded) tokens per micro-batch.
    """
    n = len(prefix_ids)
    if not n == len(prefix_lengths) == len(suffix_lengths) == len(parents) == len(extra_lengths):
        raise ValueError("prefix_ids, prefix_lengths, suffix_lengths, parents and extra_lengths must have one length")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    groups: dict[int, list[int]] = {}
    for i, pid in enumerate(prefix_ids):
        groups.setdefault(pid, []).append(i)
    for rows in groups.values():
        rows.sort(key=lambda i: -suffix_lengths[i])
    children: dict[int, list[list[int]]] = {}
    roots: list[list[int]] = []
    for rows in groups.values():
        parent = parents[rows[0]]
        if parent < 0:
            roots.append(rows)
        elif parents[parent] >= 0:
            raise ValueError(f"row {rows[0]}'s parent {parent} has a parent of its own")
        else:
            children.setdefault(parent, []).append(rows)
    for kids in children.values():
        kids.sort(key=lambda k: (-(extra_lengths[k[0]] + suffix_lengths[k[0]]), k[0]))
    roots.sort(key=lambda rows: (-(prefix_lengths[rows[0]] + suffix_lengths[rows[0]]), rows[0]))
    leftover: list[int] = []
    batches: list[list[int]] = []
    current: list[int] = []
    fill, seen = _Fill(), set()

    def kid_fill(kid: list[int]) -> _Fill:
        return _Fill(groups=1, group_rows=len(kid), extra=extra_lengths[kid[0]], group_suffix=suffix_lengths[kid[0]])

    for rows in roots:
        pid = prefix_ids[rows[0]]
        for row in sorted(rows, key=lambda i: (-len(children.get(i, [])), -suffix_lengths[i], i)):
            kids = children.pop(row, [])
            alone = _Fill(1, 1, prefix_lengths[row], suffix_lengths[row])
            family = alone
            for kid in kids:
                family = family.merge(kid_fill(kid))
            # The prefix is paid once per micro-batch: not again when the root group is already in the current one.
            joined = fill.merge(dataclasses.replace(family, roots=0) if pid in seen else family)
            if current and joined.cost() > max_tokens:
                batches.append(current)
                current, fill, seen = [], _Fill(), set()
                joined = family
            if joined.cost() <= max_tokens:
                current, fill = current + [row] + [i for kid in kids for i in kid], joined
            else:
                # A family too big alone: its row, and the children that fit with it.
                fill = fill.merge(dataclasses.replace(alone, roots=0) if pid in seen else alone)
                current.append(row)
                for kid in kids:
                    grown = fill.merge(kid_fill(kid))
                    if grown.cost() <= max_tokens:
                        current, fill = current + kid, grown
                    else:
                        leftover += kid
            seen.add(pid)
    if current:
        batches.append(current)
    # Children whose parent is no root here (a parent's parent was set): plain groups.
    leftover += [i for kids in children.values() for kid in kids for i in kid]
    if leftover:
        sub = pack_shared_prefix(
            [prefix_ids[i] for i in leftover],
            [prefix_lengths[i] for i in leftover],
            [suffix_lengths[i] for i in leftover],
            max_tokens,
        )
        batches += [[leftover[j] for j in b] for b in sub]
    return batches
