"""The shared-prefix layout: each distinct prompt (layer 1) or correction query (layer 2) runs once per micro-batch.

GRPO's G samples of a problem share its prompt and MGRPO's H layer-2 samples share their whole correction query, so
a micro-batch can run each distinct prefix once, repeat its key/value cache per row, and run only the rows' own
suffixes on top (``completion_logits``). Gradients flow back through the repeated cache into the one prefix pass, so
the loss and its gradient are those of the plain layout; the work saved is the prefix tokens of all but one row per
group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from mgrpo_pl.layouts.packing import balanced, pack_shared_prefix, shared_prefix_cost
from mgrpo_pl.layouts.padded import MicroBatch
from mgrpo_pl.rollout.types import RolloutBatch


@dataclass
class SharedPrefixMicroBatch:
    """Tensors for a prefix-sharing forward pass. U distinct prefixes, R rows, P prefix columns, K suffix columns.

    A row's sequence ``prompt ⊕ completion`` is split into the prefix ``prompt[:-1]`` (shared by every row with the
    same prompt) and the suffix ``prompt[-1] ⊕ completion[:-1]``, whose K logits predict the K completion tokens.

    Attributes:
        prefix_ids: [U, P] long, left-padded prefixes.
        prefix_mask: [U, P] long.
        prefix_positions: [U, P] long.
        prefix_index: [R] long, the prefix row each row continues.
        input_ids: [R, K] long, right-padded suffixes.
        attention_mask: [R, P + K] long, the row's prefix mask followed by its suffix mask.
        position_ids: [R, K] long, continuing the row's prompt positions.
        targets: [R, K] long, completion tokens (right-padded with the pad id).
        mask: [R, K] bool, True on completion tokens that enter the loss.
        advantages: [R] float.
        layer: [R] long.
        engine_logprobs: [R, K] float behaviour log-probs aligned with ``targets`` (0 where absent), or None.
    """

    prefix_ids: Tensor
    prefix_mask: Tensor
    prefix_positions: Tensor
    prefix_index: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    layer: Tensor
    engine_logprobs: Tensor | None


@dataclass
class Suffixes:
    """The per-row part of a prefix-sharing pass: R rows, K columns, right-padded.

    A row's suffix starts at its prompt's last token (whose logit predicts the first completion token) and runs to
    its completion's second-to-last token; ``targets`` are the completion tokens, ``mask`` those that are trained,
    ``attention_mask`` the real suffix columns and ``position_ids`` continue the prompt's positions.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    targets: Tensor
    mask: Tensor
    engine_logprobs: Tensor | None


def collate_suffixes(batch: RolloutBatch, rows: list[int], pad_id: int, mask_truncated: bool) -> Suffixes:
    """The right-padded suffixes, targets and masks of the chosen sequences of ``batch``."""
    seqs = [batch.sequences[i] for i in rows]
    device = seqs[0].device
    plens = [int(batch.prompt_lengths[i]) for i in rows]
    comp = [len(s) - p for s, p in zip(seqs, plens)]
    keep = max(max(comp), 1)
    input_ids = torch.full((len(rows), keep), pad_id, dtype=torch.long, device=device)
    targets = torch.full((len(rows), keep), pad_id, dtype=torch.long, device=device)
    suffix_mask = torch.zeros((len(rows), keep), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), keep), dtype=torch.bool, device=device)
    engine_lp = torch.zeros((len(rows), keep), device=device) if batch.engine_logprobs is not None else None
    for r, (i, seq, plen) in enumerate(zip(rows, seqs, plens)):
        suffix = seq[plen - 1 : -1] if comp[r] else seq[plen - 1 : plen]
        input_ids[r, : len(suffix)] = suffix
        suffix_mask[r, : len(suffix)] = 1
        targets[r, : comp[r]] = seq[plen:]
        if comp[r] and not (mask_truncated and bool(batch.truncated[i])):
            mask[r, : comp[r]] = True
        if engine_lp is not None and comp[r]:
            engine_lp[r, : comp[r]] = batch.engine_logprobs[i][: comp[r]].to(device)  # type: ignore[index]
    prompt_len = torch.tensor(plens, dtype=torch.long, device=device)
    position_ids = (prompt_len - 1)[:, None] + torch.arange(keep, device=device)[None, :]
    return Suffixes(input_ids, suffix_mask, position_ids, targets, mask, engine_lp)


def prompt_keys(batch: RolloutBatch) -> list[int]:
    """Per sequence, an id shared by exactly the sequences whose prompts are identical."""
    ids: dict[tuple[int, ...], int] = {}
    keys = []
    for seq, plen in zip(batch.sequences, batch.prompt_lengths.tolist()):
        keys.append(ids.setdefault(tuple(seq[:plen].tolist()), len(ids)))
    return keys


def split_lengths(batch: RolloutBatch) -> tuple[list[int], list[int]]:
    """Per row, the lengths the prefix-sharing packers count: the prefix (the prompt less its last token) and the
    suffix (at least that last token, whose logit predicts the first completion token)."""
    prefix = [p - 1 for p in batch.prompt_lengths.tolist()]
    return prefix, [max(int(c), 1) for c in batch.completion_lengths.tolist()]


def shared_prefix_plan(batch: RolloutBatch, max_tokens: int) -> list[list[int]] | None:
    """Micro-batches (row indices) for ``collate_shared_prefix``, or None when sharing cannot apply.

    Sharing needs every prompt to have at least 2 tokens (the prefix is the prompt without its last token) and pays
    off only when some prompt occurs more than once. ``max_tokens`` bounds the computed tokens per micro-batch:
    distinct prefixes times the longest prefix plus rows times the longest suffix. The micro-batches are
    ``balanced``: no more passes or computed tokens than the greedy packing at ``max_tokens``, the largest smaller
    where a smaller budget allows it.
    """
    prompt_lengths = batch.prompt_lengths.tolist()
    if not prompt_lengths or min(prompt_lengths) < 2:
        return None
    keys = prompt_keys(batch)
    if len(set(keys)) == len(keys):
        return None
    prefix, suffix = split_lengths(batch)
    cost = shared_prefix_cost(keys, prefix, suffix)
    return balanced(lambda budget: pack_shared_prefix(keys, prefix, suffix, budget), cost, max_tokens)


def collate_shared_prefix(
    batch: RolloutBatch, rows: list[int], pad_id: int, mask_truncated: bool
) -> SharedPrefixMicroBatch:
    """Split the chosen sequences into distinct left-padded prefixes and right-padded per-row suffixes."""
    seqs = [batch.sequences[i] for i in rows]
    device = seqs[0].device
    plens = [int(batch.prompt_lengths[i]) for i in rows]
    slot: dict[tuple[int, ...], int] = {}
    prefixes: list[Tensor] = []
    index = []
    for seq, plen in zip(seqs, plens):
        key = tuple(seq[: plen - 1].tolist())
        if key not in slot:
            slot[key] = len(prefixes)
            prefixes.append(seq[: plen - 1])
        index.append(slot[key])
    width = max(len(p) for p in prefixes)
    prefix_ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long, device=device)
    prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
    for u, prefix in enumerate(prefixes):
        prefix_ids[u, width - len(prefix) :] = prefix
        prefix_mask[u, width - len(prefix) :] = 1
    prefix_index = torch.tensor(index, dtype=torch.long, device=device)
    suffixes = collate_suffixes(batch, rows, pad_id, mask_truncated)
    select = torch.tensor(rows, device=batch.advantages.device)
    return SharedPrefixMicroBatch(
        prefix_ids=prefix_ids,
        prefix_mask=prefix_mask,
        prefix_positions=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
        prefix_index=prefix_index,
        input_ids=suffixes.input_ids,
        attention_mask=torch.cat([prefix_mask[prefix_index], suffixes.attention_mask], dim=1),
        position_ids=suffixes.position_ids,
        targets=suffixes.targets,
        mask=suffixes.mask,
        advantages=batch.advantages[select],
        layer=batch.layer[select],
        engine_logprobs=suffixes.engine_logprobs,
    )


def completion_logits(model: nn.Module, mb: MicroBatch | SharedPrefixMicroBatch) -> Tensor:
    """[R, K, V] logits aligned with ``mb.targets`` (``logits[:, t]`` predicts ``targets[:, t]``), either layout.

    The shared-prefix layout runs each distinct prefix once, repeats its key/value cache to the rows that continue
    it (an indexing op, so gradients from every row accumulate into the one prefix pass), then runs the suffixes.
    Needs a transformers model that accepts ``past_key_values`` with gradients (no gradient checkpointing).
    """
    if isinstance(mb, MicroBatch):
        out = model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            logits_to_keep=mb.logits_to_keep,
            use_cache=False,
        )
        return out.logits[:, :-1]
    return shared_prefix_logits(model, mb, new_cache(model))


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty key/value cache for ``model``."""
    config = getattr(model, "config", None)
    return DynamicCache(config=config) if config is not None else DynamicCache()


def shared_prefix_logits(model: nn.Module, mb: SharedPrefixMicroBatch, cache: DynamicCache) -> Tensor:
    """[R, K, V] suffix logits of a shared-prefix pass; ``cache`` is left holding each row's prefix and suffix keys
    and values ([R, ..., P + K, ...], with their graph), for a pass that continues the rows."""
    # Only the cache is wanted from the prefix pass; one logit column is the least transformers lets us ask for.
    cached_pass(model, cache, mb.prefix_ids, mb.prefix_mask, mb.prefix_positions, cache_only=True)
    cache.batch_select_indices(mb.prefix_index)
    return cached_pass(model, cache, mb.input_ids, mb.attention_mask, mb.position_ids)


def cached_pass(
    model: nn.Module,
    cache: DynamicCache,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    cache_only: bool = False,
) -> Tensor:
    """Run ``input_ids`` on top of ``cache`` (which it extends); ``attention_mask`` covers the cached columns and the
    new ones. Returns the logits of every new position, or of the last one only when ``cache_only``."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        **({"logits_to_keep": 1} if cache_only else {}),
    )
    return out.logits
