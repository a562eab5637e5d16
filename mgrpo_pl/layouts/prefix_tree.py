"""Training a layer-2 group on top of the layer-1 row it corrects, in one micro-batch.

A layer-2 query is ``q ⊕ o_i ⊕ p_guide``: the layer-1 sequence ``q ⊕ o_i`` (less its end-of-turn token) and a
guide phrase. The shared-prefix layout (``shared_prefix``) already runs that query once per group of H rows,
but the layer-1 row ``i`` computes the same ``q ⊕ o_i`` tokens, with the same weights, in its own pass. When both are
in one micro-batch, the group can start from that row's keys and values instead: it computes only the guide phrase
(the "extra" tokens) and its H suffixes. Gradients from the layer-2 loss flow through the reused keys and values
into the layer-1 row's pass, so the loss and gradient are those of the plain layout; what is saved is the ~|q|+|o_i|
query tokens per kept group, in the policy's forward and backward and in the reference's forward.

``prefix_tree_plan`` packs each problem's layer-1 group with as many of its layer-2 groups as the token budget allows
(``packing.pack_prefix_trees``); ``collate_prefix_tree`` finds, within a micro-batch, which layer-2
groups continue a layer-1 row (by comparing tokens, so it needs no bookkeeping from the rollout) and builds the two
stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgrpo_pl.layouts.packing import balanced, pack_prefix_trees, prefix_tree_cost
from mgrpo_pl.layouts.shared_prefix import (
    SharedPrefixMicroBatch,
    cached_pass,
    collate_shared_prefix,
    collate_suffixes,
    new_cache,
    prompt_keys,
    shared_prefix_logits,
    shared_prefix_plan,
    split_lengths,
)
from mgrpo_pl.rollout.types import RolloutBatch


@dataclass
class ContinuedMicroBatch:
    """A shared-prefix pass (``base``), then U2 groups continuing base rows' caches. R2 continued rows, K2 columns.

    Attributes:
        base: The rows whose prefix this micro-batch runs (layer-1 rows, and layer-2 groups without their layer-1
            row here), in the shared-prefix layout; C = its prefix plus suffix columns.
        parent_index: [U2] long, the base row each continued group starts from.
        parent_mask: [U2, C] long, that row's attention mask, cut after the tokens the group's query shares with it.
        extra_ids: [U2, E] long, right-padded query tokens past the shared ones, without the query's last token.
        extra_mask: [U2, E] long.
        extra_positions: [U2, E] long.
        group_index: [R2] long, the group each continued row belongs to.
        input_ids: [R2, K2] long, the continued rows' right-padded suffixes.
        suffix_mask: [R2, K2] long.
        position_ids: [R2, K2] long.
        continued_targets: [R2, K2] long.
        targets: [R, K] long, base rows first then continued rows, K = max(base K, K2), right-padded.
        mask: [R, K] bool, True on completion tokens that enter the loss.
        advantages: [R] float.
        layer: [R] long.
        engine_logprobs: [R, K] float or None.
    """

    base: SharedPrefixMicroBatch
    parent_index: Tensor
    parent_mask: Tensor
    extra_ids: Tensor
    extra_mask: Tensor
    extra_positions: Tensor
    group_index: Tensor
    input_ids: Tensor
    suffix_mask: Tensor
    position_ids: Tensor
    continued_targets: Tensor
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    layer: Tensor
    engine_logprobs: Tensor | None


def _shared_length(a: Tensor, b: Tensor) -> int:
    """Length of the longest common prefix of two 1-D tensors."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def find_parents(batch: RolloutBatch, rows: list[int]) -> dict[int, tuple[int, int]]:
    """For each layer-2 row among ``rows`` whose query continues a layer-1 row among them: (that row, the number of
    leading query tokens the two share).

    A layer-1 row's pass computes its sequence but the last token (``prompt ⊕ completion[:-1]``); a layer-2 row's
    prefix is its query but the last token. The parent is the layer-1 row sharing the most of them, and must share at
    least its whole prompt (a query of another problem, or a new-turn query, shares less and is left alone). A query
    whose own layer-1 row is elsewhere continues a sibling row of its problem, sharing the prompt.
    """
    plens = batch.prompt_lengths.tolist()
    layer = batch.layer.tolist()
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i in rows:
        if layer[i] == 1:
            by_prompt.setdefault(tuple(batch.sequences[i][: plens[i]].tolist()), []).append(i)
    found: dict[tuple[int, ...], tuple[int, int] | None] = {}
    out: dict[int, tuple[int, int]] = {}
    for i in rows:
        if layer[i] != 2 or plens[i] < 2:
            continue
        prefix = batch.sequences[i][: plens[i] - 1]
        key = tuple(prefix.tolist())
        if key not in found:
            best: tuple[tuple[int, bool], tuple[int, int]] | None = None
            for prompt, candidates in by_prompt.items():
                if key[: len(prompt)] != prompt:
                    continue
                for c in candidates:
                    seq = batch.sequences[c]
                    fed = seq[: max(len(seq) - 1, plens[c])]
                    shared = _shared_length(fed, prefix)
                    # Ties (a row whose completion is empty shares just the prompt, as every sibling does) go to
                    # the row the query continues whole.
                    score = (shared, shared == len(fed))
                    if shared >= plens[c] and (best is None or score > best[0]):
                        best = (score, (c, shared))
            found[key] = best[1] if best is not None else None
        if found[key] is not None:
            out[i] = found[key]  # type: ignore[assignment]
    return out


def prefix_tree_plan(batch: RolloutBatch, max_tokens: int) -> list[list[int]] | None:
    """Micro-batches for ``collate_prefix_tree``, or None when prefix sharing cannot apply (see
    ``shared_prefix_plan``); without layer-2 rows to continue, the shared-prefix plan itself."""
    parents = find_parents(batch, list(range(len(batch))))
    plens = batch.prompt_lengths.tolist()
    if not parents or min(plens) < 2:
        return shared_prefix_plan(batch, max_tokens)
    parent = [-1] * len(batch)
    extra = [0] * len(batch)
    for i, (p, shared) in parents.items():
        parent[i], extra[i] = p, plens[i] - 1 - shared
    keys, (prefix, suffix) = prompt_keys(batch), split_lengths(batch)
    cost = prefix_tree_cost(keys, prefix, suffix, parent, extra)
    return balanced(lambda budget: pack_prefix_trees(keys, prefix, suffix, parent, extra, budget), cost, max_tokens)


def pad_columns(x: Tensor, width: int, value: float = 0) -> Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def collate_prefix_tree(
    batch: RolloutBatch, rows: list[int], pad_id: int, mask_truncated: bool
) -> SharedPrefixMicroBatch | ContinuedMicroBatch:
    """The chosen rows in two stages when some layer-2 group continues a layer-1 row among them, else in the plain
    shared-prefix layout."""
    parents = find_parents(batch, rows)
    if not parents:
        return collate_shared_prefix(batch, rows, pad_id, mask_truncated)
    base_rows = [i for i in rows if i not in parents]
    cont_rows = [i for i in rows if i in parents]
    base = collate_shared_prefix(batch, base_rows, pad_id, mask_truncated)
    device = base.prefix_ids.device
    at_base = {row: r for r, row in enumerate(base_rows)}
    slot: dict[tuple[int, ...], int] = {}
    groups: list[tuple[int, int, int]] = []  # (first row, parent row, shared tokens)
    index = []
    for i in cont_rows:
        key = tuple(batch.sequences[i][: int(batch.prompt_lengths[i]) - 1].tolist())
        if key not in slot:
            slot[key] = len(groups)
            groups.append((i, *parents[i]))
        index.append(slot[key])
    parent_index = torch.tensor([at_base[p] for _, p, _ in groups], dtype=torch.long, device=device)
    parent_mask = base.attention_mask[parent_index].clone()
    prefix_width = base.prefix_ids.shape[1]
    extras = []
    for u, (i, p, shared) in enumerate(groups):
        # The parent's token t >= its prompt length - 1 sits in suffix column t - (prompt length - 1).
        parent_mask[u, prefix_width + shared - (int(batch.prompt_lengths[p]) - 1) :] = 0
        extras.append(batch.sequences[i][shared : int(batch.prompt_lengths[i]) - 1])
    width = max(len(e) for e in extras)
    extra_ids = torch.full((len(groups), width), pad_id, dtype=torch.long, device=device)
    extra_mask = torch.zeros((len(groups), width), dtype=torch.long, device=device)
    for u, extra in enumerate(extras):
        extra_ids[u, : len(extra)] = extra
        extra_mask[u, : len(extra)] = 1
    shared_len = torch.tensor([s for _, _, s in groups], dtype=torch.long, device=device)
    extra_positions = shared_len[:, None] + torch.arange(width, device=device)[None, :]
    suffixes = collate_suffixes(batch, cont_rows, pad_id, mask_truncated)
    keep = max(base.targets.shape[1], suffixes.targets.shape[1])
    engine_lp = None
    if batch.engine_logprobs is not None:
        engine_lp = torch.cat([pad_columns(base.engine_logprobs, keep), pad_columns(suffixes.engine_logprobs, keep)])
    select = torch.tensor(base_rows + cont_rows, device=batch.advantages.device)
    return ContinuedMicroBatch(
        base=base,
        parent_index=parent_index,
        parent_mask=parent_mask,
        extra_ids=extra_ids,
        extra_mask=extra_mask,
        extra_positions=extra_positions,
        group_index=torch.tensor(index, dtype=torch.long, device=device),
        input_ids=suffixes.input_ids,
        suffix_mask=suffixes.attention_mask,
        position_ids=suffixes.position_ids,
        continued_targets=suffixes.targets,
        targets=torch.cat([pad_columns(base.targets, keep, pad_id), pad_columns(suffixes.targets, keep, pad_id)]),
        mask=torch.cat([pad_columns(base.mask, keep, False), pad_columns(suffixes.mask, keep, False)]),
        advantages=batch.advantages[select],
        layer=batch.layer[select],
        engine_logprobs=engine_lp,
    )


def continued_logits(model: nn.Module, mb: ContinuedMicroBatch) -> tuple[Tensor, Tensor]:
    """([R1, K1, V] base logits, [R2, K2, V] continued logits), each aligned with its own targets."""
    cache = new_cache(model)
    base_logits = shared_prefix_logits(model, mb.base, cache)
    # An indexing op on the cache: each continued group's gradient flows back into its parent row's pass.
    cache.batch_select_indices(mb.parent_index)
    mask = mb.parent_mask
    if mb.extra_ids.shape[1]:
        mask = torch.cat([mask, mb.extra_mask], dim=1)
        cached_pass(model, cache, mb.extra_ids, mask, mb.extra_positions, cache_only=True)
    cache.batch_select_indices(mb.group_index)
    mask = torch.cat([mask[mb.group_index], mb.suffix_mask], dim=1)
    return base_logits, cached_pass(model, cache, mb.input_ids, mask, mb.position_ids)
