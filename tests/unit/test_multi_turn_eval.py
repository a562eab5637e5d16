"""An N-turn evaluation (``eval_turns``), checked against what the real engine was given and returned.

Turn t continues turn t-1: its query is turn t-1's query ⊕ turn t-1's answer (end token dropped) ⊕ the evaluation
phrase, all in one assistant turn. The query tokens, the scored texts, the records and the per-pair transition
metrics are rebuilt here by hand from the recordings.
"""

from __future__ import annotations

import pytest
import torch
from recording import Recorder

from mgrpo_pl.data.problems import Problem
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.metrics import SelfCorrectionMetrics, pair_values, turn_pairs
from mgrpo_pl.metrics.report import columns, summarize
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rewards import Reward
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import TransformersEngine
from mgrpo_pl.rollout.types import SamplingConfig

PROBLEMS = [Problem(id=f"q{i}", question=f"What is {a} + 0?", answer=str(a)) for i, a in enumerate((3, 4))]
GUIDE = "Wait, let me double-check that."


class LengthParity(Reward):
    """1 for an even number of characters: a random model's turns differ in correctness."""

    def __call__(self, completions, answers):
        return torch.tensor([float(len(c) % 2 == 0) for c in completions])


@pytest.fixture(scope="module")
def three_turns(tiny_model_path):
    model, tokenizer = load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))
    config = RolloutConfig(
        num_generations=2,
        eval_samples=2,
        eval_turns=3,
        eval_guide=GUIDE,
        eval_sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
        turn2_scoring="correction",
    )
    rollout = MGRPORollout(config, tokenizer, LengthParity())
    engine = Recorder(TransformersEngine(model, tokenizer))
    torch.manual_seed(0)
    return rollout, engine, rollout.evaluate(engine, PROBLEMS), tokenizer


def test_turn_three_continues_turn_two_with_the_guide_again(three_turns):
    rollout, engine, batch, tokenizer = three_turns
    assert len(engine.calls) == 3  # one call per turn
    first, second, third = (call.out for call in engine.calls)
    turn2_queries, turn3_queries = engine.calls[1].prompts, engine.calls[2].prompts
    guide = tokenizer(rollout.config.guide_separator + GUIDE, add_special_tokens=False)["input_ids"]
    end = set(engine.end_ids)
    for i, query in enumerate(turn3_queries):
        body = list(second.token_ids[i])
        while body and body[-1] in end:  # the turn stays open: its end token is dropped
            body.pop()
        assert query == turn2_queries[i] + body + guide, i
        # and turn 2's query is itself the prompt ⊕ turn 1 ⊕ the same guide
        assert query[: len(turn2_queries[i])] == turn2_queries[i]
        assert turn2_queries[i][-len(guide) :] == guide and query[-len(guide) :] == guide


def test_every_turn_is_scored_and_recorded(three_turns):
    _, engine, batch, _ = three_turns
    texts = [call.out.texts for call in engine.calls]
    expected = [torch.tensor([len(t) % 2 == 0 for t in turn]) for turn in texts]  # "correction": each text alone
    assert len(batch.correct) == 3
    for turn, (got, want) in enumerate(zip(batch.correct, expected), 1):
        assert torch.equal(got, want), turn
    for i, record in enumerate(batch.records):
        assert [record[f"turn{t}"] for t in (1, 2, 3)] == [texts[0][i], texts[1][i], texts[2][i]]
        assert [record[f"correct_t{t}"] for t in (1, 2, 3)] == [bool(c[i]) for c in expected]
        assert record["answer_t3_from"] == "turn3"  # nothing is inherited under the "correction" reading


def test_turn_pairs_and_their_names():
    assert turn_pairs(2) == [(1, 2)]
    assert turn_pairs(4) == [(1, 2), (2, 3), (3, 4), (1, 4)]
    # Turns 1..3 of 4 problems, by hand: t1 = [1,0,0,1], t2 = [1,1,0,0], t3 = [0,1,1,0].
    t = [torch.tensor(v, dtype=torch.bool) for v in ([1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0])]
    logged = {}
    for a, b in turn_pairs(3):
        metric = SelfCorrectionMetrics()
        metric.update(t[a - 1], t[b - 1])
        logged.update(pair_values(a, b, metric.compute()))
    hand = {
        "acc_t1": 0.5, "acc_t2": 0.5, "delta": 0.0, "delta_i2c": 0.25, "delta_c2i": 0.25,  # 1→2: #1 i→c, #3 c→i
        "acc_t3": 0.5, "delta_t2_t3": 0.0, "delta_i2c_t2_t3": 0.25, "delta_c2i_t2_t3": 0.25,  # 2→3: #2 i→c, #0 c→i
        "delta_t1_t3": 0.0, "delta_i2c_t1_t3": 0.5, "delta_c2i_t1_t3": 0.5,  # 1→3: #1, #2 i→c; #0, #3 c→i
    }  # fmt: skip
    for key, value in hand.items():
        assert float(logged[key]) == pytest.approx(value), key


def test_report_adds_the_later_turns_columns():
    rows = [
        {"sample": 0, "correct_t1": a, "correct_t2": b, "correct_t3": c}
        for a, b, c in [(1, 1, 0), (0, 1, 1), (0, 0, 1), (1, 0, 0)]
    ]
    summary = summarize(rows)
    assert summary["acc_t3"] == pytest.approx(0.5) and summary["delta_i2c_t1_t3"] == pytest.approx(0.5)
    keys = [k for k, _ in columns([summary])]
    assert keys[:5] == ["acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"]
    assert keys[5:] == ["acc_t3", "delta_i2c_t2_t3", "delta_c2i_t2_t3", "delta_i2c_t1_t3", "delta_c2i_t1_t3"]
    two = summarize([{k: v for k, v in r.items() if k != "correct_t3"} for r in rows])
    assert [k for k, _ in columns([two])] == keys[:5]  # two turns: the paper's table only


def test_fewer_than_two_turns_names_the_flag():
    with pytest.raises(ConfigError, match="--data.rollout.eval_turns must be >= 2"):
        RolloutConfig(eval_turns=1)
