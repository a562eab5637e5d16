"""Layer-2 groups trained on top of their layer-1 row: the packing, the parent search, and log-probs and gradients
identical to the plain left-padded layout."""

from __future__ import annotations

import random

import pytest
import torch

from mgrpo_pl.layouts import completion_logprobs, computed_tokens, micro_batch_layout
from mgrpo_pl.layouts.packing import balanced, pack_prefix_trees, prefix_tree_cost
from mgrpo_pl.layouts.padded import collate_micro_batch
from mgrpo_pl.layouts.prefix_tree import ContinuedMicroBatch, collate_prefix_tree, find_parents, prefix_tree_plan
from mgrpo_pl.layouts.shared_prefix import SharedPrefixMicroBatch
from mgrpo_pl.modeling import load_causal_lm
from mgrpo_pl.rollout.types import RolloutBatch

EOS = 2


def _batch(seed: int = 0) -> tuple[RolloutBatch, dict[int, int]]:
    """2 prompts x 3 layer-1 samples (one cut without its end token, one empty), then layer-2 groups of 2 rows
    continuing four of them, built as the pipeline builds queries (the sample less its end token, then a guide
    phrase). Returns the batch and, per layer-2 row, the layer-1 row it continues."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> torch.Tensor:
        return torch.randint(3, 200, (n,), generator=g)

    prompts = [rand(5), rand(7)]
    seqs, plens, truncated = [], [], []
    for p in prompts:
        for n, ended in ((4, True), (6, False), (0, False)):
            body = rand(n - 1 if ended else n)
            seqs.append(torch.cat([p, body, torch.tensor([EOS] if ended else [], dtype=torch.long)]))
            plens.append(len(p))
            truncated.append(not ended and n > 0)
    parent_of = {}
    for parent, guide_len in ((0, 3), (1, 2), (2, 1), (4, 4)):
        seq, plen = seqs[parent], plens[parent]
        body = seq[plen:]
        body = body[:-1] if len(body) and body[-1] == EOS else body
        query = torch.cat([seq[:plen], body, rand(guide_len)])
        for n in (3, 5):
            parent_of[len(seqs)] = parent
            seqs.append(torch.cat([query, rand(n)]))
            plens.append(len(query))
            truncated.append(False)
    n = len(seqs)
    lengths = [len(s) - p for s, p in zip(seqs, plens)]
    batch = RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(plens),
        advantages=torch.randn(n, generator=g),
        layer=torch.tensor([1] * 6 + [2] * (n - 6)),
        truncated=torch.tensor(truncated),
        rewards=torch.zeros(n),
        num_problems=2,
        correct_t1=torch.zeros(6, dtype=torch.bool),
        correct_t2=torch.zeros(6, dtype=torch.bool),
        engine_logprobs=[-torch.rand(k, generator=g) for k in lengths],
    )
    return batch, parent_of


def test_find_parents_matches_the_rows_the_queries_were_built_from():
    batch, parent_of = _batch()
    found = find_parents(batch, list(range(len(batch))))
    assert {i: p for i, (p, _) in found.items()} == parent_of
    plens = batch.prompt_lengths
    for i, (p, shared) in found.items():
        fed = batch.sequences[p][: max(len(batch.sequences[p]) - 1, int(plens[p]))]
        # An ended sample shares all it fed; a cut one also its last token, which its own pass never fed.
        assert shared == len(fed)
        assert torch.equal(batch.sequences[i][:shared], fed)
    # Without its own row in the micro-batch, a query continues a sibling's prompt.
    rows = [i for i in range(len(batch)) if i != 0]
    found = find_parents(batch, rows)
    assert set(found) == set(parent_of)
    for i, (p, shared) in found.items():
        if parent_of[i] == 0:
            assert p in (1, 2) and shared == int(plens[0])
        else:
            assert p == parent_of[i]


def _aligned(mb, values):
    return [values[r][mb.mask[r]] for r in range(mb.mask.shape[0])]


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("without_parent", [False, True])
def test_same_logprobs_and_gradient_as_plain_layout(tiny_model_path, mask_truncated, without_parent):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_path).train()
    batch, _ = _batch()
    # Without row 0, its children continue a sibling's prompt only.
    rows = [i for i in range(len(batch)) if not (without_parent and i == 0)]
    tree = collate_prefix_tree(batch, rows, 0, mask_truncated)
    assert isinstance(tree, ContinuedMicroBatch)
    assert tree.parent_index.shape[0] == 4
    order = [i for i in rows if i not in find_parents(batch, rows)] + [
        i for i in rows if i in find_parents(batch, rows)
    ]
    plain = collate_micro_batch(batch, order, 0, mask_truncated)

    def run(mb):
        model.zero_grad()
        logp = completion_logprobs(model, mb)
        (logp * mb.mask * mb.advantages[:, None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return _aligned(mb, logp.detach()), _aligned(mb, mb.engine_logprobs), grads

    lp_plain, eng_plain, g_plain = run(plain)
    lp_tree, eng_tree, g_tree = run(tree)
    assert [len(x) for x in lp_plain] == [len(x) for x in lp_tree]
    for a, b in zip(lp_plain, lp_tree):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(eng_plain, eng_tree):
        torch.testing.assert_close(a, b)
    assert g_plain.keys() == g_tree.keys()
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_tree[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(plain.advantages, tree.advantages)
    torch.testing.assert_close(plain.layer, tree.layer)


def test_collate_without_layer2_children_is_the_shared_prefix_layout():
    batch, _ = _batch()
    assert isinstance(collate_prefix_tree(batch, list(range(6)), 0, False), SharedPrefixMicroBatch)


def test_pack_hand_example():
    # Rows 0-1: a root group (prefix 4, suffixes 6, 5); rows 2-3 continue row 0 (extra 2, suffixes 3, 3); rows 4-5
    # continue row 1 (extra 2, suffix 4). Row 0's family costs 4 + 6 + 2 + 2*3 = 18; both: 4 + 2*6 + 2*2 + 4*4 = 36.
    ids = [0, 0, 1, 1, 2, 2]
    prefix = [4, 4, 12, 12, 12, 12]
    suffix = [6, 5, 3, 3, 4, 4]
    parents = [-1, -1, 0, 0, 1, 1]
    extra = [0, 0, 2, 2, 2, 2]
    assert pack_prefix_trees(ids, prefix, suffix, parents, extra, 36) == [[0, 2, 3, 1, 4, 5]]
    # At 30 the root group is split, each row with its children (row 1's family: 4 + 5 + 2 + 2*4 = 19).
    assert pack_prefix_trees(ids, prefix, suffix, parents, extra, 30) == [[0, 2, 3], [1, 4, 5]]
    # A family over the budget alone: its row, and the children that do not fit packed as plain groups.
    assert pack_prefix_trees(ids, prefix, suffix, parents, extra, 10) == [[0], [1], [4], [5], [2], [3]]
    # Without children, the plain shared-prefix packing.
    assert pack_prefix_trees([0, 0], [4, 4], [6, 5], [-1, -1], [0, 0], 16) == [[0, 1]]


def test_pack_and_balance_every_index_once():
    rng = random.Random(0)
    for _ in range(100):
        ids, prefix, suffix, parents, extra = [], [], [], [], []
        for root in range(rng.randint(1, 4)):
            plen = rng.randint(1, 20)
            first = len(ids)
            for _ in range(rng.randint(1, 5)):
                ids.append(root)
                prefix.append(plen)
                suffix.append(rng.randint(1, 30))
                parents.append(-1)
                extra.append(0)
            last = len(ids)
            for kid in range(rng.randint(0, 3)):
                parent, e, klen = rng.randrange(first, last), rng.randint(0, 5), rng.randint(1, 30)
                for _ in range(rng.randint(1, 4)):
                    ids.append(100 * (root + 1) + kid)
                    prefix.append(plen + 10)
                    suffix.append(klen)
                    parents.append(parent)
                    extra.append(e)
        budget = rng.randint(1, 200)
        batches = pack_prefix_trees(ids, prefix, suffix, parents, extra, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(ids)))
        # balanced: the same rows, never more passes, tokens or peak, within the budget but for lone rows over it
        cost = prefix_tree_cost(ids, prefix, suffix, parents, extra)
        args = (ids, prefix, suffix, parents, extra)
        plan = balanced(lambda b, args=args: pack_prefix_trees(*args, b), cost, budget)
        assert sorted(i for b in plan for i in b) == list(range(len(ids)))
        assert len(plan) <= len(batches) and sum(map(cost, plan)) <= sum(map(cost, batches))
        assert max(map(cost, plan)) <= max(map(cost, batches))
        assert all(cost(b) <= budget or len(b) == 1 for b in plan + batches)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="one length"):
        pack_prefix_trees([0], [1], [1], [-1, -1], [0], 10)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_prefix_trees([0], [1], [1], [-1], [0], 0)
    with pytest.raises(ValueError, match="parent of its own"):
        pack_prefix_trees([0, 1, 2], [1, 1, 1], [1, 1, 1], [-1, 0, 1], [0, 0, 0], 10)


def test_plan_packs_children_with_their_parent():
    batch, parent_of = _batch()
    plan = prefix_tree_plan(batch, 10_000)
    assert plan is not None and sorted(i for b in plan for i in b) == list(range(len(batch)))
    where = {i: k for k, b in enumerate(plan) for i in b}
    assert all(where[child] == where[parent] for child, parent in parent_of.items())


@pytest.mark.parametrize("budget", [10_000, 60, 40, 25])
@pytest.mark.parametrize("shared, tree", [(False, False), (True, False), (True, True)])
def test_balanced_layouts_keep_the_budget_in_computed_tokens(shared, tree, budget):
    """The packers count what the collate computes, so a balanced plan's micro-batches stay within the budget."""
    batch, _ = _batch()
    plan, collate = micro_batch_layout(batch, budget, shared=shared, tree=tree)
    assert sorted(i for rows in plan for i in rows) == list(range(len(batch)))
    sizes = [computed_tokens(collate(batch, rows, 0, False)) for rows in plan]
    assert max(sizes) <= budget, sizes
    if budget == 10_000:
        assert len(plan) == 1


def _tree_cost(batch):
    from mgrpo_pl.layouts.packing import prefix_tree_cost
    from mgrpo_pl.layouts.shared_prefix import prompt_keys, split_lengths

    plens = batch.prompt_lengths.tolist()
    parents, extra = [-1] * len(batch), [0] * len(batch)
    for i, (parent, shared) in find_parents(batch, list(range(len(batch)))).items():
        parents[i], extra[i] = parent, plens[i] - 1 - shared
    prefix, suffix = split_lengths(batch)
    keys = prompt_keys(batch)
    return prefix_tree_cost(keys, prefix, suffix, parents, extra), (keys, prefix, suffix, parents, extra)


def test_prefix_tree_cost_is_what_the_collate_computes():
    batch, parent_of = _batch()
    cost, _ = _tree_cost(batch)
    rng = random.Random(0)
    for _ in range(30):  # random micro-batches holding the parents of their layer-2 rows, as the packer makes them
        rows = rng.sample(range(len(batch)), rng.randint(1, len(batch)))
        closed = sorted(set(rows) | {parent_of[i] for i in rows if i in parent_of})
        assert cost(closed) == computed_tokens(collate_prefix_tree(batch, closed, 0, False)), closed


def test_balanced_prefix_tree_plan_lowers_the_largest_pass():
    """An MGRPO-shaped batch (4 problems x G=4, 2 kept queries each x H=2): greedy packing at 220 tokens leaves
    219 + 73 computed tokens, the balanced plan 146 + 146 with each group still on top of its layer-1 row."""
    from scripts.bench import layout as bench_layout

    args = bench_layout.parse_args(
        "--problems=4 --num-generations=4 --kept-per-problem=2 --num-corrections=2 --prompt-length=6 "
        "--completion-length=8 --guide-length=3".split()
    )
    batch = bench_layout.synthetic_batch(args, vocab=200, eos=EOS)
    cost, packer_args = _tree_cost(batch)
    greedy = pack_prefix_trees(*packer_args, 220)
    assert [cost(rows) for rows in greedy] == [219, 73]
    plan, collate = micro_batch_layout(batch, 220, shared=True, tree=True)
    assert [computed_tokens(collate(batch, rows, 0, False)) for rows in plan] == [146, 146]
    where = {i: k for k, rows in enumerate(plan) for i in rows}
    parents = packer_args[3]
    assert all(where[i] == where[p] for i, p in enumerate(parents) if p >= 0)
