"""Layer-2 planning: queries continue the assistant turn, selection keeps verified probes, bookkeeping maps back."""

import pytest
import torch

from mgrpo_pl.algo.correction import (
    DEFAULT_GUIDE_PHRASES,
    CorrectionPlan,
    GuidePool,
    build_correction_query,
    cap_per_problem,
    continuation_body,
    select_verified,
)

END = [99]


def test_default_pool_is_the_papers_seven_phrases():
    assert len(DEFAULT_GUIDE_PHRASES) == 7
    assert DEFAULT_GUIDE_PHRASES[1] == "Wait, let me double-check that."


def test_query_is_prompt_then_completion_without_end_token_then_guide():
    prompt, completion, guide = [1, 2, 3], [10, 11, 99], [50, 51]
    assert build_correction_query(prompt, completion, guide, END) == [1, 2, 3, 10, 11, 50, 51]


def test_unfinished_completion_is_kept_whole():
    assert continuation_body([10, 11, 12], END) == [10, 11, 12]


def test_completion_is_cut_before_think_close():
    # "<think> a b </think> answer <end>" -> the guide must land inside the thinking block.
    completion = [7, 10, 11, 40, 41, 12, 99]
    assert continuation_body(completion, END, think_close_ids=[40, 41]) == [7, 10, 11]


def test_guide_pool_rejects_empty_and_blank():
    with pytest.raises(ValueError, match="guide_phrases"):
        GuidePool([])
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        GuidePool(["ok", "  "])


def test_guide_pool_draws_every_phrase_and_is_seeded():
    pool = GuidePool()
    a = pool.sample(200, torch.Generator().manual_seed(3))
    b = pool.sample(200, torch.Generator().manual_seed(3))
    assert a == b
    assert set(a) == set(range(7))


def test_selection_and_bookkeeping():
    # B=2 problems, G=3 samples each; probes of samples 1 (problem 0) and 3, 5 (problem 1) verified.
    probe = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    kept = select_verified(probe)
    assert kept.tolist() == [1, 3, 5]
    plan = CorrectionPlan.from_selection(kept, 3)
    assert plan.problem_index.tolist() == [0, 1, 1]
    assert plan.kept_per_problem(2).tolist() == [1, 2]
    assert len(plan) == 3


def test_cap_keeps_at_most_cap_per_problem_from_the_verified():
    # G=4: problem 0 verified 3 queries, problem 1 one, problem 2 none, problem 3 all four.
    kept = torch.tensor([0, 1, 3, 6, 12, 13, 14, 15])
    out = cap_per_problem(kept, 4, 2, torch.Generator().manual_seed(0))
    assert out.tolist() == sorted(out.tolist()) and set(out.tolist()) <= set(kept.tolist())
    per_problem = torch.bincount(out // 4, minlength=4).tolist()
    assert per_problem == [2, 1, 0, 2]  # a problem under the cap keeps all it has
    same = cap_per_problem(kept, 4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert torch.equal(cap_per_problem(kept, 4, 4, None), kept)
    assert cap_per_problem(torch.zeros(0, dtype=torch.long), 4, 1, None).numel() == 0
    with pytest.raises(ValueError, match="cap"):
        cap_per_problem(kept, 4, 0, None)


def test_cap_draws_uniformly_and_per_problem_generators_are_independent():
    kept = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # G=8, one problem, all verified
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(8)
    draws = 4000
    for _ in range(draws):
        counts[cap_per_problem(kept, 8, 2, generator)] += 1
    # Each query is kept with probability 2/8: 1000 of 4000, binomial sd ~27.
    assert torch.all((counts - 1000).abs() < 150), counts.tolist()
    # With one generator per problem, problem 1's draw does not depend on whether problem 0 had anything to draw.
    both = torch.tensor([0, 1, 2, 8, 9, 10, 11])
    alone = torch.tensor([8, 9, 10, 11])

    def gens():
        return [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]

    assert cap_per_problem(both, 8, 2, gens())[2:].tolist() == cap_per_problem(alone, 8, 2, gens()).tolist()


def test_no_probe_verified_gives_empty_plan():
    plan = CorrectionPlan.from_selection(select_verified(torch.zeros(4)), 2)
    assert len(plan) == 0
    assert plan.kept_per_problem(2).tolist() == [0, 0]


def test_cap_and_plan_with_the_problems_of_deeper_layer_candidates():
    # A deeper layer's candidates are the previous layer's rows: problem 0 owns rows 0-2, problem 2 rows 3-7.
    owners = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])
    kept = torch.tensor([0, 2, 3, 4, 6, 7])
    out = cap_per_problem(kept, owners, 2, torch.Generator().manual_seed(0))
    assert set(out.tolist()) <= set(kept.tolist()) and out.tolist() == sorted(out.tolist())
    assert torch.bincount(owners[out], minlength=3).tolist() == [2, 0, 2]
    plan = CorrectionPlan.from_selection(kept, owners)
    assert plan.problem_index.tolist() == [0, 0, 2, 2, 2, 2]
    assert plan.kept_per_problem(3).tolist() == [2, 0, 4]
