"""The two-layer rollout on a real tiny model: groups, selection, bookkeeping, advantages and evaluation."""

import pytest
import torch

from mgrpo_pl.data.loaders import Problem
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rewards import read_final_answer
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import TransformersEngine
from mgrpo_pl.rollout.types import SamplingConfig
from plugin_rewards import NeverReward, ParityReward

PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(3)]


@pytest.fixture(scope="module")
def engine_and_tokenizer(tiny_model_path):
    tok = load_tokenizer(str(tiny_model_path))
    return TransformersEngine(load_causal_lm(str(tiny_model_path)), tok), tok


def _config(**kw):
    base = dict(
        num_generations=4,
        num_corrections=3,
        sampling=SamplingConfig(max_new_tokens=10, temperature=1.0),
        eval_sampling=SamplingConfig(max_new_tokens=8, temperature=0.7),
    )
    base.update(kw)
    return RolloutConfig(**base)


def test_two_layer_rollout_structure(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    torch.manual_seed(0)
    reward = ParityReward()
    batch = MGRPORollout(_config(), tok, reward).rollout(engine, PROBLEMS)
    B, G, H = 3, 4, 3
    probe_rewards = reward.calls[1]  # layer-1 call, then probes, then layer-2 samples
    K = sum(len(t) % 2 == 0 for t in probe_rewards)
    assert 0 < K < B * G, "the parity reward should verify some probes and reject others"
    assert batch.stats["layer2/kept_queries"] == K
    assert len(batch) == B * G + K * H
    assert (batch.layer == 1).sum() == B * G and (batch.layer == 2).sum() == K * H
    assert batch.correct_t1.shape == (B * G,) and batch.correct_t2.shape == (B * G,)
    assert batch.correct_t2.sum() == K
    # Advantages are group-relative: each layer-1 group and each layer-2 group sums to ~0.
    adv1 = batch.advantages[: B * G].view(B, G)
    adv2 = batch.advantages[B * G :].view(K, H)
    torch.testing.assert_close(adv1.sum(1), torch.zeros(B), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv2.sum(1), torch.zeros(K), atol=1e-5, rtol=0)
    # Every layer-2 sequence starts with its problem's prompt and continues the layer-1 tokens of a kept sample.
    prompt_lens = batch.prompt_lengths
    for row in range(B * G, len(batch)):
        assert prompt_lens[row] > prompt_lens[0]
    assert len(batch.engine_logprobs) == len(batch)
    for seq, plen, lp in zip(batch.sequences, prompt_lens, batch.engine_logprobs):
        assert len(lp) == len(seq) - plen


def test_layer2_sequences_continue_the_kept_layer1_sample(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    torch.manual_seed(1)
    rollout = MGRPORollout(_config(guide_phrases=["Wait, let me double-check that."]), tok, ParityReward())
    batch = rollout.rollout(engine, PROBLEMS[:1])
    guide = tok("\n\nWait, let me double-check that.", add_special_tokens=False)["input_ids"]
    layer1 = [s.tolist() for s in batch.sequences[:4]]
    for row in range(4, len(batch)):
        query = batch.sequences[row][: batch.prompt_lengths[row]].tolist()
        assert query[-len(guide) :] == guide
        body = query[: -len(guide)]
        # The query body is one of the layer-1 sequences with its end-of-turn token dropped.
        assert any(body == s[: len(body)] and len(s) - len(body) in (0, 1) for s in layer1)


def test_no_probe_verified_skips_layer2_cleanly(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    batch = MGRPORollout(_config(), tok, NeverReward()).rollout(engine, PROBLEMS)
    assert len(batch) == 12 and (batch.layer == 2).sum() == 0
    assert batch.stats["layer2/kept_queries"] == 0
    assert torch.all(batch.advantages == 0)  # all-wrong groups: zero advantage, no NaN


def test_layer2_off_is_one_round_grpo(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    reward = ParityReward()
    batch = MGRPORollout(_config(layer2=False), tok, reward).rollout(engine, PROBLEMS)
    assert len(reward.calls) == 1 and len(batch) == 12 and batch.correct_t2.numel() == 0


def test_reuse_probe_counts_the_probe_as_one_sample(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    torch.manual_seed(2)
    reward = ParityReward()
    batch = MGRPORollout(_config(reuse_probe=True), tok, reward).rollout(engine, PROBLEMS)
    K = int(batch.stats["layer2/kept_queries"])
    assert (batch.layer == 2).sum() == K * 3
    if K:
        # The first member of every layer-2 group is the verified probe: reward 1.
        assert torch.all(batch.rewards[12:].view(K, 3)[:, 0] == 1)


@pytest.mark.parametrize("joint", [False, True])
def test_max_kept_per_problem_caps_layer2_from_the_verified_queries(engine_and_tokenizer, joint):
    engine, tok = engine_and_tokenizer
    torch.manual_seed(0)
    reward = ParityReward()
    batch = MGRPORollout(_config(max_kept_per_problem=1, joint_layer2=joint), tok, reward).rollout(engine, PROBLEMS)
    B, G, H = 3, 4, 3
    probe_ok = torch.tensor([len(t) % 2 == 0 for t in reward.calls[1]])
    verified_per_problem = probe_ok.view(B, G).sum(1)
    assert batch.stats["layer2/verified_queries"] == int(probe_ok.sum())
    K = int(batch.stats["layer2/kept_queries"])
    assert K == int(verified_per_problem.clamp(max=1).sum()) and K < int(probe_ok.sum()), "the seed should cap"
    assert (batch.layer == 2).sum() == K * H
    # Every kept query is a verified one: its layer-2 prompt continues a layer-1 sample whose probe passed.
    layer1 = [s.tolist() for s in batch.sequences[: B * G]]
    for row in range(B * G, len(batch), H):
        query = batch.sequences[row][: batch.prompt_lengths[row]].tolist()
        owners = [i for i, s in enumerate(layer1) if query[: len(s) - 1] == s[: len(s) - 1]]
        assert owners and all(probe_ok[i] for i in owners)
    with pytest.raises(ValueError, match="max_kept_per_problem"):
        RolloutConfig(max_kept_per_problem=0)


def test_evaluation_two_turns(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    result = MGRPORollout(_config(eval_samples=2, eval_guide="Check again."), tok, ParityReward()).evaluate(
        engine, PROBLEMS
    )
    assert len(result) == 6
    assert [r["problem_id"] for r in result.records] == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert all(r["guide"] == "Check again." for r in result.records)
    for r, c1, c2 in zip(result.records, result.correct_t1, result.correct_t2):
        assert r["correct_t1"] == bool(c1) == (len(r["turn1"]) % 2 == 0)
        # turn 2 is the answer the model ends with: the correction where it states one, else turn 1's text
        stated = read_final_answer(r["turn2"])
        scored = r["turn2"] if stated is not None else r["turn1"]
        assert r["answer_t2_from"] == ("turn2" if stated is not None else "turn1")
        assert r["correct_t2"] == bool(c2) == (len(scored) % 2 == 0)
        assert r["turn2_scoring"] == "final"


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="num_generations"):
        RolloutConfig(num_generations=1)
    with pytest.raises(ValueError, match="num_corrections"):
        RolloutConfig(num_corrections=0)
    with pytest.raises(ValueError, match="guide_phrases"):
        RolloutConfig(guide_phrases=[])
    with pytest.warns(UserWarning, match="temperature is 0"):
        RolloutConfig(sampling=SamplingConfig(temperature=0.0))


def test_new_turn_evaluation_asks_in_a_user_message(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    prompt = "Please fix any mistakes."
    rollout = MGRPORollout(_config(eval_turn2="new_turn", eval_guide=prompt), tok, ParityReward())
    result = rollout.evaluate(engine, PROBLEMS[:1])
    query = rollout._new_turn_query(PROBLEMS[0], result.records[0]["turn1"])
    text = tok.decode(query)
    # user, assistant (turn 1), user (the baseline's prompt), then the assistant's generation prompt.
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2
    assert prompt in text and text.rstrip().endswith("<|im_start|>assistant")
    assert result.records[0]["guide"] == prompt
    with pytest.raises(ValueError, match="eval_guide"):
        RolloutConfig(eval_turn2="new_turn", eval_guide=None)


def test_prompt_longer_than_the_context_names_problem_and_flag(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    long = Problem(id="long-1", question="What is " + " + ".join(["1"] * 900) + "?", answer="900", source="x.jsonl:7")
    with pytest.raises(ValueError, match=r"problem 'long-1' \(x.jsonl:7\).*--data.rollout.sampling.max_new_tokens"):
        MGRPORollout(_config(), tok, ParityReward()).rollout(engine, [long])


def test_layer2_query_longer_than_the_context_is_refused(engine_and_tokenizer, monkeypatch):
    engine, tok = engine_and_tokenizer
    prompt_len = len(MGRPORollout(_config(), tok, ParityReward()).encode(PROBLEMS[:1])[0])
    # Room for the problem and its completion, not for the layer-2 query (problem + completion + guide + correction).
    monkeypatch.setattr(engine, "max_context", prompt_len + 10)
    with pytest.raises(ValueError, match="layer-2 query of problem 'p0'"):
        MGRPORollout(_config(), tok, ParityReward()).rollout(engine, PROBLEMS[:1])


class _CountingEngine:
    """Counts engine calls and rows; generates with the real engine."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, sampling, n=1):
        self.calls.append((len(prompts), n))
        return self.engine.generate(prompts, sampling, n=n)


@pytest.mark.parametrize("reuse_probe", [False, True])
def test_joint_layer2_draws_probe_and_group_in_one_call(engine_and_tokenizer, reuse_probe):
    engine, tok = engine_and_tokenizer
    counting = _CountingEngine(engine)
    torch.manual_seed(4)
    reward = ParityReward()
    batch = MGRPORollout(_config(joint_layer2=True, reuse_probe=reuse_probe), tok, reward).rollout(counting, PROBLEMS)
    B, G, H = 3, 4, 3
    per_query = H if reuse_probe else H + 1
    assert counting.calls == [(B, G), (B * G, per_query)]  # layer 1, then probes and groups together
    K = int(batch.stats["layer2/kept_queries"])
    assert K == sum(len(t) % 2 == 0 for t in reward.calls[1])
    assert 0 < K < B * G, "the parity reward should verify some probes and reject others"
    assert (batch.layer == 2).sum() == K * H
    adv2 = batch.advantages[B * G :].view(K, H)
    torch.testing.assert_close(adv2.sum(1), torch.zeros(K), atol=1e-5, rtol=0)
    if reuse_probe:
        assert torch.all(batch.rewards[B * G :].view(K, H)[:, 0] == 1)
    # Every group's query is one whose probe was verified; all drawn tokens are counted as generated.
    drawn = batch.stats["tokens/layer2_drawn"]
    assert drawn >= batch.stats["tokens/layer2"]
    expected = batch.stats["tokens/layer1"] + batch.stats["tokens/probe"] + drawn
    assert batch.stats["tokens/generated"] == expected
    assert len(batch.engine_logprobs) == len(batch)
    for seq, plen, lp in zip(batch.sequences, batch.prompt_lengths, batch.engine_logprobs):
        assert len(lp) == len(seq) - plen


@pytest.mark.parametrize("reuse_probe", [False, True])
def test_generated_tokens_count_each_drawn_token_once(engine_and_tokenizer, reuse_probe):
    """Sequential layer 2: a reused probe is one of the H samples but was drawn (and counted) as a probe."""
    engine, tok = engine_and_tokenizer
    counting = _CountingEngine(engine)
    torch.manual_seed(4)
    batch = MGRPORollout(_config(reuse_probe=reuse_probe), tok, ParityReward()).rollout(counting, PROBLEMS)
    B, G, H = 3, 4, 3
    K = int(batch.stats["layer2/kept_queries"])
    assert 0 < K < B * G
    fresh = H - 1 if reuse_probe else H
    assert counting.calls == [(B, G), (B * G, 1), (K, fresh)]
    lengths = [len(s) - p for s, p in zip(batch.sequences, batch.prompt_lengths)]
    layer2 = [n for n, layer in zip(lengths, batch.layer.tolist()) if layer == 2]
    drawn = sum(n for i, n in enumerate(layer2) if not (reuse_probe and i % H == 0))  # the probe comes first
    assert batch.stats["tokens/layer2"] == sum(layer2)
    assert batch.stats["tokens/layer2_drawn"] == drawn
    expected = batch.stats["tokens/layer1"] + batch.stats["tokens/probe"] + drawn
    assert batch.stats["tokens/generated"] == expected


def test_each_question_is_tokenized_once_and_callers_get_their_own_lists(engine_and_tokenizer, monkeypatch):
    from mgrpo_pl.method import encode_prompt

    _, tok = engine_and_tokenizer
    pipeline = MGRPORollout(_config(), tok, ParityReward())
    calls = []
    real = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = pipeline.encode(PROBLEMS)
    first[0].append(-1)  # a caller changing its list changes nothing for the next
    again = pipeline.encode(PROBLEMS + [Problem(id="new", question="What is 9 + 9?", answer="18")])
    assert len(calls) == len(PROBLEMS) + 1
    config = pipeline.config
    want = [encode_prompt(tok, p.question, config.instruction, config.system_prompt) for p in PROBLEMS]
    assert again[: len(PROBLEMS)] == want
