"""Prefix sharing: the packing arithmetic, and log-probs and gradients identical to the plain left-padded layout."""

from __future__ import annotations

import random

import pytest
import torch

from mgrpo_pl.algo.logprobs import token_logprobs
from mgrpo_pl.layouts.packing import pack_shared_prefix
from mgrpo_pl.layouts.padded import collate_micro_batch
from mgrpo_pl.layouts.shared_prefix import collate_shared_prefix, completion_logits, shared_prefix_plan
from mgrpo_pl.modeling import load_causal_lm
from mgrpo_pl.rollout.types import RolloutBatch


def test_pack_hand_example():
    # Two groups: id 0 (prefix 10, suffixes 5, 3) and id 1 (prefix 4, suffix 6); budget 30.
    # Group 0 first (10 + 5 = 15 > 4 + 6): row 0 costs 1*10 + 1*5 = 15; + row 1: 1*10 + 2*5 = 20 <= 30.
    # + row 2 (new prefix): 2*10 + 3*6 = 38 > 30 -> new micro-batch.
    assert pack_shared_prefix([0, 0, 1], [10, 10, 4], [5, 3, 6], 30) == [[0, 1], [2]]
    # A large budget keeps everything together: group 1 first (2 + 9 = 11 > 8 + 2), longest suffix first inside.
    assert pack_shared_prefix([1, 0, 1, 0], [2, 8, 2, 8], [3, 1, 9, 2], 1000) == [[2, 0, 3, 1]]


def test_pack_every_index_once_within_budget():
    rng = random.Random(0)
    ids = [rng.randrange(12) for _ in range(150)]
    plen = {g: rng.randint(1, 80) for g in set(ids)}
    suffix = [rng.randint(1, 60) for _ in ids]
    batches = pack_shared_prefix(ids, [plen[g] for g in ids], suffix, 600)
    assert sorted(i for b in batches for i in b) == list(range(150))
    for b in batches:
        cost = len({ids[i] for i in b}) * max(plen[ids[i]] for i in b) + len(b) * max(suffix[i] for i in b)
        assert cost <= 600 or len(b) == 1


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_shared_prefix([0], [1], [1], 0)
    with pytest.raises(ValueError, match="same length"):
        pack_shared_prefix([0, 1], [1], [1, 1], 10)


def _batch(seed: int = 0) -> RolloutBatch:
    """3 prompts (lengths 5, 7, 2) x 3 samples with ragged completions (one empty), plus one lone long prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 200, (n,), generator=g) for n in (5, 7, 2)]
    seqs, plens = [], []
    for p in prompts:
        for n in (4, 0, 6):
            seqs.append(torch.cat([p, torch.randint(3, 200, (n,), generator=g)]))
            plens.append(len(p))
    seqs.append(torch.randint(3, 200, (15,), generator=g))
    plens.append(11)
    n = len(seqs)
    lengths = [len(s) - p for s, p in zip(seqs, plens)]
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(plens),
        advantages=torch.randn(n, generator=g),
        layer=torch.tensor([1] * 9 + [2]),
        truncated=torch.tensor([i % 4 == 0 for i in range(n)]),
        rewards=torch.zeros(n),
        num_problems=3,
        correct_t1=torch.zeros(9, dtype=torch.bool),
        correct_t2=torch.zeros(0, dtype=torch.bool),
        engine_logprobs=[-torch.rand(k, generator=g) for k in lengths],
    )


def test_plan_covers_rows_and_declines_when_useless():
    batch = _batch()
    plan = shared_prefix_plan(batch, 10_000)
    assert plan is not None and sorted(i for b in plan for i in b) == list(range(len(batch)))
    unique = _batch()
    unique.sequences, unique.prompt_lengths = unique.sequences[:1], unique.prompt_lengths[:1]
    assert shared_prefix_plan(unique, 100) is None  # no prompt occurs twice
    short = _batch()
    short.prompt_lengths = torch.ones(len(short), dtype=torch.long)
    assert shared_prefix_plan(short, 100) is None  # a 1-token prompt leaves no prefix


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_same_logprobs_and_gradient_as_plain_layout(tiny_model_path, mask_truncated):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_path).train()
    batch = _batch()
    rows = list(range(len(batch)))
    plain = collate_micro_batch(batch, rows, 0, mask_truncated)
    shared = collate_shared_prefix(batch, rows, 0, mask_truncated)
    assert shared.prefix_ids.shape[0] == 4  # three shared prompts and the lone one

    def aligned(mb, logp):
        # Plain rows are right-aligned, shared rows left-aligned: compare the masked tokens in order.
        return [logp[r][mb.mask[r]] for r in range(len(rows))]

    def run(mb):
        model.zero_grad()
        logp = token_logprobs(completion_logits(model, mb), mb.targets)
        (logp * mb.mask * mb.advantages[:, None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return aligned(mb, logp.detach()), aligned(mb, mb.engine_logprobs), grads

    lp_plain, eng_plain, g_plain = run(plain)
    lp_shared, eng_shared, g_shared = run(shared)
    for a, b in zip(lp_plain, lp_shared):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(eng_plain, eng_shared):
        torch.testing.assert_close(a, b)
    assert g_plain.keys() == g_shared.keys()
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_shared[name], atol=1e-5, rtol=1e-4, msg=name)
    assert int(plain.mask.sum()) == int(shared.mask.sum())
    torch.testing.assert_close(plain.advantages, shared.advantages)
