"""The rollout's bookkeeping, derived again in the test from what the engine generated and the reward was asked.

The real tiny model generates through a real ``TransformersEngine``; a thin recorder keeps what each ``generate``
call was given and returned (nothing is replaced). From those recordings alone the test rebuilds, by the method's
definition (DESIGN "The method in one screen"):

* every completion is scored against its own problem's gold answer (the reward depends on the answer);
* layer-1 rewards and advantages, turn 2's scored text under each ``turn2_scoring``, the verified and kept queries;
* every row of a layer-2 group carries exactly ``prompt ⊕ that kept sample (end token dropped) ⊕ its guide``, and its
  rewards and group advantages;

and compares them with the ``RolloutBatch``. Wiring bugs this catches: negated advantages, gold answers shifted
between problems, a group attached to another query, turn 2 read against another rule, a threshold ignored.
"""

from __future__ import annotations

import pytest
import torch
from recording import GoldModReward, Recorder, score

from mgrpo_pl.algo.advantages import group_advantages
from mgrpo_pl.data.loaders import Problem
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rewards import read_final_answer
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import TransformersEngine
from mgrpo_pl.rollout.types import SamplingConfig

# Gold answers of both parities and residues mod 3: shifting them by one problem changes the rewards.
PROBLEMS = [Problem(id=f"q{i}", question=f"What is {a} + 0?", answer=str(a)) for i, a in enumerate((3, 4, 8))]
B, G, H = 3, 4, 3
GUIDES = ["Wait, let me double-check that.", "Hmm, let me check again.", "Let me verify."]
SEP = "\n\n"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_path):
    return load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))


def _phase(recorder: Recorder, n: int):
    """Every prompt and sample of the calls made with ``n`` samples per prompt, in call order."""
    prompts, tokens, texts = [], [], []
    for call in recorder.calls:
        if call.n == n:
            prompts += call.prompts
            tokens += call.out.token_ids
            texts += call.out.texts
    return prompts, tokens, texts


CASES = {
    "default": {},
    "turn2_correction_threshold_half": {"turn2_scoring": "correction", "correct_threshold": 0.5},
    "turn2_full": {"turn2_scoring": "full"},
    "reuse_probe": {"reuse_probe": True},
    "max_kept_per_problem": {"max_kept_per_problem": 1, "correct_threshold": 0.5},
    "seed_per_problem": {"seed_per_problem": True, "correct_threshold": 0.5},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_bookkeeping_matches_the_method(model_and_tokenizer, case):
    model, tok = model_and_tokenizer
    options = CASES[case]
    config = RolloutConfig(
        num_generations=G,
        num_corrections=H,
        guide_phrases=GUIDES,
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
        **options,
    )
    engine = Recorder(TransformersEngine(model, tok))
    reward = GoldModReward()
    torch.manual_seed(3)
    batch = MGRPORollout(config, tok, reward).rollout(engine, PROBLEMS)
    threshold, mode = config.correct_threshold, config.turn2_scoring
    gold = [p.answer for p in PROBLEMS for _ in range(G)]

    # Layer 1: G samples of each problem's prompt, scored against that problem's answer.
    prompts, tokens1, texts1 = _phase(engine, G)
    assert len(tokens1) == B * G and len(set(map(tuple, prompts))) == B
    assert reward.calls[0] == (texts1, gold)
    r1 = torch.tensor([score(t, a) for t, a in zip(texts1, gold)])
    layer1 = batch.layer == 1
    torch.testing.assert_close(batch.rewards[layer1], r1)
    torch.testing.assert_close(batch.advantages[layer1], group_advantages(r1.view(B, G), "group", 1e-6).flatten())
    for i in range(B * G):
        assert batch.sequences[i].tolist() == prompts[i // G] + tokens1[i]
    assert batch.correct_t1.tolist() == (r1 >= threshold).tolist()

    # Probes: one per layer-1 sample, on prompt ⊕ sample (end token dropped) ⊕ "\n\n" + a pool phrase.
    queries, probe_tokens, probe_texts = _phase(engine, 1)
    assert len(queries) == B * G
    guide_ids = {phrase: tok(SEP + phrase, add_special_tokens=False)["input_ids"] for phrase in GUIDES}
    phrases = []
    for i, query in enumerate(queries):
        body = list(tokens1[i])
        while body and body[-1] in engine.end_ids:
            body.pop()
        found = [p for p, ids in guide_ids.items() if query == prompts[i // G] + body + ids]
        assert len(found) == 1, f"probe query {i} is not its own sample plus a guide phrase"
        phrases.append(found[0])
    # Turn 2's scored text, by the rule each mode names.
    if mode == "final":
        scored = [c if read_final_answer(c) is not None else o for o, c in zip(texts1, probe_texts)]
    elif mode == "correction":
        scored = list(probe_texts)
    else:
        scored = [f"{o}{SEP}{p} {c}" for o, p, c in zip(texts1, phrases, probe_texts)]
    assert reward.calls[1] == (scored, gold)
    rp = torch.tensor([score(t, a) for t, a in zip(scored, gold)])
    assert batch.correct_t2.tolist() == (rp >= threshold).tolist()
    verified = [k for k in range(B * G) if rp[k] >= threshold]

    # Layer 2: H samples per kept query (the verified probe first with reuse_probe), each row on its own query.
    fresh = H - 1 if config.reuse_probe else H
    group_queries, group_tokens, group_texts = _phase(engine, fresh)
    kept = [queries.index(q) for q in group_queries]  # the queries are distinct: each sample differs or its guide
    assert kept == sorted(kept) and set(kept) <= set(verified)
    cap = config.max_kept_per_problem
    for problem in range(B):
        mine = [k for k in verified if k // G == problem]
        assert sum(k // G == problem for k in kept) == (len(mine) if cap is None else min(cap, len(mine)))
    K = len(kept)
    assert batch.stats["layer2/kept_queries"] == K and batch.stats["layer2/verified_queries"] == len(verified)
    assert 0 < K, "this seed should keep some queries"
    rows = torch.nonzero(batch.layer == 2).flatten().tolist()
    assert len(rows) == K * H
    expected_texts, expected_sources = [], []
    for j, k in enumerate(kept):
        samples = [(probe_tokens[k], probe_texts[k])] if config.reuse_probe else []
        samples += [(group_tokens[j * fresh + h], group_texts[j * fresh + h]) for h in range(fresh)]
        for h, (sample_tokens, text) in enumerate(samples):
            row = rows[j * H + h]
            assert batch.sequences[row].tolist() == queries[k] + sample_tokens, (j, h)
            assert int(batch.prompt_lengths[row]) == len(queries[k])
            expected_texts.append(text)
            expected_sources.append(k)
    if mode == "final":
        scored2 = [
            t if read_final_answer(t) is not None else texts1[k] for t, k in zip(expected_texts, expected_sources)
        ]
    elif mode == "correction":
        scored2 = expected_texts
    else:
        scored2 = [f"{texts1[k]}{SEP}{phrases[k]} {t}" for t, k in zip(expected_texts, expected_sources)]
    assert reward.calls[2] == (scored2, [gold[k] for k in expected_sources])
    r2 = torch.tensor([score(t, gold[k]) for t, k in zip(scored2, expected_sources)])
    torch.testing.assert_close(batch.rewards[rows], r2)
    torch.testing.assert_close(batch.advantages[rows], group_advantages(r2.view(K, H), "group", 1e-6).flatten())


def test_bookkeeping_cases_cover_both_turn2_sources(model_and_tokenizer):
    """The ``final`` rule is exercised both ways on this model: some corrections state an answer, some do not."""
    model, tok = model_and_tokenizer
    engine = TransformersEngine(model, tok)
    torch.manual_seed(3)
    out = engine.generate([tok("What is 3 + 0?")["input_ids"]] * 4, SamplingConfig(max_new_tokens=10), n=8)
    stated = [read_final_answer(t) is not None for t in out.texts]
    assert any(stated) and not all(stated), out.texts
