"""Prefix reuse across calls of one rollout: the same completions as a fresh prefill, with less prefill work."""

import pytest
import torch

from mgrpo_pl.data.loaders import Problem
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import TransformersEngine
from mgrpo_pl.rollout.engines.cpu.decoding import sample_completions
from mgrpo_pl.rollout.engines.cpu.prefix_cache import PrefixCache
from mgrpo_pl.rollout.types import SamplingConfig
from plugin_rewards import ParityReward

GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return load_causal_lm(str(tiny_model_path)).eval()


@pytest.fixture()
def prefill_tokens(model):
    """Counts the tokens of every forward that takes more than one token per row (the prefills)."""
    seen: list[int] = []

    def hook(_module, _args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen.append(ids.numel())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield seen
    handle.remove()


def _kv(length: int, value: float, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    k = torch.full((1, length, 2), value)
    return [(k.clone(), -k.clone()) for _ in range(layers)]


def test_match_takes_the_longest_common_prefix_and_leaves_the_last_token():
    cache = PrefixCache(budget_bytes=1 << 20)
    assert cache.match([[1, 2, 3]]) == [(-1, 0)]
    cache.add(torch.tensor([1, 2, 3, 4]), _kv(4, 1.0))
    cache.add(torch.tensor([1, 2, 9, 9, 9, 9]), _kv(6, 2.0))
    assert cache.match([[1, 2, 3, 4, 5, 6]]) == [(0, 4)]  # entry 0 is a prefix of the prompt
    assert cache.match([[1, 2, 3, 4]]) == [(0, 3)]  # the whole prompt is stored: its last token is kept back
    assert cache.match([[1, 2, 9, 9, 7]]) == [(1, 4)]  # a longer entry: its first 4 positions serve
    assert cache.match([[5, 1, 2], [1]]) == [(-1, 0), (-1, 0)]  # no common start; a 1-token prompt reuses nothing


def test_gather_right_aligns_each_rows_keys():
    cache = PrefixCache(budget_bytes=1 << 20)
    cache.add(torch.tensor([1, 2, 3]), _kv(3, 1.0))
    cache.add(torch.tensor([4, 5]), _kv(2, 2.0))
    (keys, values), _ = cache.gather([(0, 3), (1, 1), (-1, 0)], width=3)
    assert keys.shape == (3, 1, 3, 2)
    assert keys[:, 0, :, 0].tolist() == [[1, 1, 1], [0, 0, 2], [0, 0, 0]]
    assert torch.equal(values, -keys)


def test_budget_stops_storing():
    cache = PrefixCache(budget_bytes=2 * 2 * 4 * 2 * 4)  # two layers of keys + values, 4 positions x 2 floats
    assert cache.add(torch.tensor([1, 2, 3, 4]), _kv(4, 1.0))
    assert not cache.add(torch.tensor([5]), _kv(1, 1.0))
    assert len(cache) == 1 and cache.used_bytes == cache.budget_bytes


def test_reused_prefixes_give_the_same_completions_with_less_prefill(model, prefill_tokens):
    """Layer 1 is sampled into the cache (with early ends, so finished rows are stored when they leave the batch);
    then queries that continue its sequences, one unrelated prompt and one repeated query are decoded greedily with
    and without the cache."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 9, 14)]
    cache = PrefixCache(budget_bytes=1 << 26)
    # A quarter of the vocabulary ends a row: rows finish at different steps and the batch compacts.
    ends = list(range(3, vocab // 4))
    torch.manual_seed(0)
    first, finished, _ = sample_completions(
        model, prompts, 2, SamplingConfig(max_new_tokens=12, temperature=1.0), ends, 0, prefix=cache
    )
    assert len(cache) == 6 and any(finished) and not all(finished)
    guide = [7, 8, 9]
    rows = enumerate(zip(first, finished))
    queries = [prompts[i // 2] + (ids[:-1] if done else ids) + guide for i, (ids, done) in rows]
    queries.append(torch.randint(3, vocab, (7,), generator=gen).tolist())

    prefill_tokens.clear()
    fresh, fresh_done, fresh_lp = sample_completions(model, queries, 1, GREEDY, [], 0)
    fresh_cost = sum(prefill_tokens)
    prefill_tokens.clear()
    reused, reused_done, reused_lp = sample_completions(model, queries, 1, GREEDY, [], 0, prefix=cache)
    assert reused == fresh and reused_done == fresh_done
    torch.testing.assert_close(torch.tensor(reused_lp), torch.tensor(fresh_lp), atol=1e-4, rtol=0)
    # Each query computes its guide and the unrelated prompt all but its last token, in one padded batch.
    assert sum(prefill_tokens) < fresh_cost / 2

    # The same queries again (a layer-2 group after its probe): every prompt is cached but its last token.
    prefill_tokens.clear()
    again, _, again_lp = sample_completions(model, queries[:-1], 2, GREEDY, [], 0, prefix=cache)
    assert again == [seq for seq in fresh[:-1] for _ in range(2)]
    torch.testing.assert_close(
        torch.tensor(again_lp), torch.tensor([lp for lp in fresh_lp[:-1] for _ in range(2)]), atol=1e-4, rtol=0
    )
    assert prefill_tokens == []


def test_engine_scopes_the_cache_to_its_context(tiny_model_path):
    tok = load_tokenizer(str(tiny_model_path))
    engine = TransformersEngine(load_causal_lm(str(tiny_model_path)), tok, share_weights=False)
    prompt = tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    engine.generate([prompt], GREEDY)
    assert engine._prefix is None  # nothing is kept outside the context
    with engine.reuse_prefixes():
        engine.generate([prompt], GREEDY)
        assert len(engine._prefix) == 1
        engine.update_weights(engine.model.named_parameters())  # new weights: the stored keys are stale
        assert engine._prefix is None
    assert engine._prefix is None
    off = TransformersEngine(engine.model, tok, prefix_cache_mib=0)
    with off.reuse_prefixes():
        off.generate([prompt], GREEDY)
        assert off._prefix is None
    with pytest.raises(ValueError, match="prefix_cache_mib"):
        TransformersEngine(engine.model, tok, prefix_cache_mib=-1)


def test_rollout_is_the_same_with_and_without_reuse(tiny_model_path, model):
    """A whole two-layer rollout, greedy in both layers, gives the same batch with the cache on and off."""
    tok = load_tokenizer(str(tiny_model_path))
    problems = [Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(2)]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    config = RolloutConfig(num_generations=2, num_corrections=2, sampling=greedy, eval_sampling=greedy)
    batches = []
    for mib in (512, 0):
        engine = TransformersEngine(model, tok, prefix_cache_mib=mib)
        batches.append(MGRPORollout(config, tok, ParityReward()).rollout(engine, problems))
    on, off = batches
    assert on.stats["layer2/kept_queries"] == off.stats["layer2/kept_queries"] > 0
    assert [s.tolist() for s in on.sequences] == [s.tolist() for s in off.sequences]
    assert torch.equal(on.advantages, off.advantages)
    for a, b in zip(on.engine_logprobs, off.engine_logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
