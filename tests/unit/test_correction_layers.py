"""N correction layers: layer 3 corrects layer 2 the way layer 2 corrects layer 1, rebuilt here from the recordings.

The real tiny model generates through a real ``TransformersEngine``; a recorder keeps each ``generate`` call's
prompts and outputs. From those alone the test derives, by the method's definition, what a three-layer step must hold:

* every layer-3 query is ``layer-2 query ⊕ that layer-2 sample (end token dropped) ⊕ sep + a phrase of layer 3's own
  pool``, token by token, with the phrase tokenized here;
* the kept layer-3 queries are those whose probe the reward accepted, against their own problem's gold answer, with
  turn 3 read from the layer-2 sample's judged text under ``final``;
* layer-3 rows carry the kept query ⊕ each of its H_3 samples, their rewards and group advantages by hand;
* layer 3's own settings (H, pool, max_new_tokens) are the ones used.
"""

from __future__ import annotations

import math

import pytest
import torch
from recording import GoldModReward, Recorder, score

from mgrpo_pl.data.loaders import Problem
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rewards import read_final_answer
from mgrpo_pl.rollout.config import CorrectionLayerSettings, RolloutConfig
from mgrpo_pl.rollout.engines import TransformersEngine
from mgrpo_pl.rollout.types import SamplingConfig

PROBLEMS = [Problem(id=f"q{i}", question=f"What is {a} + 0?", answer=str(a)) for i, a in enumerate((3, 4, 8))]
G, H2, H3 = 4, 3, 2
GUIDES = ["Wait, let me double-check that.", "Hmm, let me check again."]
GUIDES3 = ["Once more, carefully:", "Let me verify the last step."]
SEP = "\n\n"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_path):
    return load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))


def _config(**kw) -> RolloutConfig:
    options = {
        "num_generations": G,
        "num_corrections": H2,
        "guide_phrases": GUIDES,
        "think_close": None,
        "correct_threshold": 0.5,
        "sampling": SamplingConfig(max_new_tokens=10, temperature=1.0),
    }
    return RolloutConfig(**{**options, **kw})


def _judged(previous: str, correction: str) -> str:
    """Turn k's text under ``final``: the correction when it states an answer, else the previous turn's."""
    return correction if read_final_answer(correction) is not None else previous


def _advantages(rewards: list[float]) -> list[float]:
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]


@pytest.mark.parametrize("scoring", ["final", "correction"])
def test_layer_three_corrects_layer_two(model_and_tokenizer, scoring):
    model, tok = model_and_tokenizer
    override = CorrectionLayerSettings(
        num_corrections=H3, guide_phrases=GUIDES3, correction_sampling=SamplingConfig(max_new_tokens=6)
    )
    config = _config(num_layers=3, layer_overrides={3: override}, turn2_scoring=scoring)
    engine = Recorder(TransformersEngine(model, tok))
    torch.manual_seed(5)
    batch = MGRPORollout(config, tok, GoldModReward()).rollout(engine, PROBLEMS)
    assert len(engine.calls) == 5, "layer 1, layer-2 probes and groups, layer-3 probes and groups"
    first, probe2, group2, probe3, group3 = (call.out for call in engine.calls)
    q2, k2, q3, k3 = (engine.calls[i].prompts for i in (1, 2, 3, 4))
    n2, n3 = engine.calls[2].n, engine.calls[4].n
    len3, len3b = (engine.calls[i].sampling.max_new_tokens for i in (3, 4))
    assert (n2, n3, len3, len3b) == (H2, H3, 6, 6)  # layer 3's own H and max_new_tokens
    end = set(engine.end_ids)
    gold = [p.answer for p in PROBLEMS]

    def body(ids):
        ids = list(ids)
        while ids and ids[-1] in end:
            ids.pop()
        return ids

    pool2 = [tok(SEP + g, add_special_tokens=False)["input_ids"] for g in GUIDES]
    pool3 = [tok(SEP + g, add_special_tokens=False)["input_ids"] for g in GUIDES3]

    # Layer 2 from layer 1, to know each layer-2 row's problem and judged text.
    turn1 = [(i // G, first.texts[i]) for i in range(len(first))]
    judged1 = [t for _, t in turn1]
    read2 = [_judged(judged1[i], probe2.texts[i]) if scoring == "final" else probe2.texts[i] for i in range(len(q2))]
    kept2 = [i for i in range(len(q2)) if score(read2[i], gold[turn1[i][0]]) >= 0.5]
    assert k2 == [q2[i] for i in kept2]
    rows2 = []  # (problem, query, completion ids, judged text), in batch order
    for j, i in enumerate(kept2):
        for h in range(H2):
            text = group2.texts[j * H2 + h]
            judged = _judged(judged1[i], text) if scoring == "final" else text
            rows2.append((turn1[i][0], q2[i], group2.token_ids[j * H2 + h], judged))

    # Every layer-3 query continues its layer-2 row with a phrase of layer 3's pool, never layer 2's.
    assert len(q3) == len(rows2) > 0
    for query, (_, q, completion, _) in zip(q3, rows2):
        head = q + body(completion)
        assert query[: len(head)] == head
        assert query[len(head) :] in pool3 and query[len(head) :] not in pool2

    # Selection: the probe read as turn 3, against the owning problem's gold.
    read3 = [_judged(rows2[i][3], probe3.texts[i]) if scoring == "final" else probe3.texts[i] for i in range(len(q3))]
    kept3 = [i for i in range(len(q3)) if score(read3[i], gold[rows2[i][0]]) >= 0.5]
    assert k3 == [q3[i] for i in kept3]
    assert batch.stats["layer3/verified_queries"] == batch.stats["layer3/kept_queries"] == len(kept3)
    assert batch.stats["tokens/probe3"] == sum(len(t) for t in probe3.token_ids)

    # Layer-3 rows: kept query ⊕ sample, reward of the sample read as turn 3, group advantages.
    layer3 = (batch.layer == 3).nonzero().flatten().tolist()
    assert len(layer3) == H3 * len(kept3) > 0
    rewards = []
    for j, i in enumerate(kept3):
        group = []
        for h in range(H3):
            row, sample = layer3[j * H3 + h], j * H3 + h
            assert batch.sequences[row].tolist() == q3[i] + group3.token_ids[sample]
            assert int(batch.prompt_lengths[row]) == len(q3[i])
            text = group3.texts[sample]
            group.append(score(_judged(rows2[i][3], text) if scoring == "final" else text, gold[rows2[i][0]]))
        rewards.append(group)
    assert batch.rewards[layer3].tolist() == [r for g in rewards for r in g]
    want = [a for g in rewards for a in _advantages(g)]
    torch.testing.assert_close(batch.advantages[layer3], torch.tensor(want), atol=1e-5, rtol=0)
    assert batch.num_layers == 3
    assert batch.layer.tolist() == sorted(batch.layer.tolist())  # layer 1, then 2, then 3


def test_one_layer_is_layer2_off_and_two_layers_the_default(model_and_tokenizer):
    model, tok = model_and_tokenizer

    def run(config):
        torch.manual_seed(1)
        return MGRPORollout(config, tok, GoldModReward()).rollout(TransformersEngine(model, tok), PROBLEMS)

    for a, b in [(_config(num_layers=1), _config(layer2=False)), (_config(num_layers=2), _config())]:
        x, y = run(a), run(b)
        assert [s.tolist() for s in x.sequences] == [s.tolist() for s in y.sequences]
        assert torch.equal(x.advantages, y.advantages) and torch.equal(x.layer, y.layer)
        assert x.stats.keys() == y.stats.keys()
    assert set(run(_config(num_layers=1)).layer.tolist()) == {1}


def test_layer_count_and_overrides_resolve():
    assert (_config().depth, _config(layer2=False).depth, _config(num_layers=3).depth) == (2, 1, 3)
    assert (_config().turns, _config(num_layers=3).turns, _config(num_layers=1).turns) == (2, 3, 2)
    assert _config(num_layers=3, eval_turns=2).turns == 2
    config = _config(num_layers=4, max_kept_per_problem=2, layer_overrides={3: {"num_corrections": 5}})
    three, four = config.correction_layer(3), config.correction_layer(4)
    assert (three.num_corrections, three.max_kept_per_problem, three.guide_phrases) == (5, 2, tuple(GUIDES))
    assert (four.num_corrections, four.fresh_corrections) == (H2, H2)
    assert [layer.layer for layer in config.correction_layers] == [2, 3, 4]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer2": False, "num_layers": 3}, r"layer2=false .* --data.rollout.num_layers=3"),
        ({"num_layers": 0}, r"num_layers must be >= 1"),
        ({"num_layers": 3, "layer_overrides": {4: {}}}, r"layer_overrides\.4: only correction layers 2\.\.3"),
        ({"num_layers": 3, "layer_overrides": {1: {}}}, r"layer_overrides\.1"),
        ({"num_layers": 3, "layer_overrides": {3: {"num_corrections": 0}}}, r"layer_overrides\.3\.num_corrections"),
        ({"num_layers": 3, "layer_overrides": {3: {"guide_phrases": [" "]}}}, r"layer_overrides\.3\.guide_phrases"),
        (
            {"num_layers": 3, "layer_overrides": {3: {"correction_sampling": SamplingConfig(temperature=0.5)}}},
            r"layer_overrides\.3\.correction_sampling\.temperature=0\.5",
        ),
    ],
)
def test_layer_settings_that_contradict_name_the_flag(options, message):
    with pytest.raises(ConfigError, match=message):
        _config(**options)
