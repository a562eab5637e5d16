"""The sampling loop: same tokens as transformers' generate, shared prompts, compaction, top-k/top-p, the cache."""

import pytest
import torch

from mgrpo_pl.method import encode_prompt
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rollout.engines import end_token_ids
from mgrpo_pl.rollout.engines.cpu.decoding import _ReservedLayer, choose_tokens, sample_completions, sample_rows
from mgrpo_pl.rollout.types import SamplingConfig


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_path):
    """The tiny model with its weights shaken: untouched, its greedy output repeats one token, which would let
    position or cache bugs through."""
    model = load_causal_lm(str(tiny_model_path)).eval()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.5)
    return model, load_tokenizer(str(tiny_model_path))


def _prompts(tokenizer):
    questions = ("What is 2 + 3?", "What is 10 * 4 minus 7?", "Is 91 prime? Explain briefly.")
    return [encode_prompt(tokenizer, q, "Answer in \\boxed{}.") for q in questions]


def _hf_greedy(model, prompts, steps, end_ids, pad_id):
    """One prompt at a time through ``model.generate`` (no padding), cut after the first end token."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=steps,
            eos_token_id=end_ids,
            pad_token_id=pad_id,
        )[0, len(prompt) :].tolist()
        cut = next((i + 1 for i, t in enumerate(gen) if t in end_ids), len(gen))
        out.append(gen[:cut])
    return out


def test_greedy_matches_transformers_generate_for_every_sample(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts, ends = _prompts(tok), end_token_ids(model, tok)
    expected = _hf_greedy(model, prompts, 16, ends, tok.pad_token_id)
    tokens, finished, logprobs = sample_completions(
        model, prompts, 3, SamplingConfig(max_new_tokens=16, temperature=0.0), ends, tok.pad_token_id
    )
    assert len({tuple(seq) for seq in expected}) == len(prompts)
    assert tokens == [seq for seq in expected for _ in range(3)]  # prompt-major, each of the n rows
    assert finished == [bool(seq) and seq[-1] in ends for seq in tokens]
    assert [len(lp) for lp in logprobs] == [len(seq) for seq in tokens]


def test_rows_that_end_early_leave_the_batch_without_changing_any_output(model_and_tokenizer):
    """End ids chosen from the greedy continuations make rows stop at different steps; dropping them from the
    batch at every end (compact_below=1) or never (0) gives what one-prompt-at-a-time generate gives."""
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)
    free = _hf_greedy(model, prompts, 12, [tok.pad_token_id], tok.pad_token_id)
    ends = sorted({free[0][2], free[1][6]})  # two rows stop early (unless the token also appears earlier)
    expected = _hf_greedy(model, prompts, 12, ends, tok.pad_token_id)
    assert len({len(seq) for seq in expected}) > 1, "the chosen end ids should end rows at different steps"
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    for compact in (0.0, 1.0):
        tokens, finished, _ = sample_completions(model, prompts, 2, greedy, ends, tok.pad_token_id, compact)
        assert tokens == [seq for seq in expected for _ in range(2)]
        assert finished == [seq[-1] in ends for seq in tokens]


def test_sampled_logprobs_match_a_forward_and_samples_differ(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts, ends = _prompts(tok)[:2], end_token_ids(model, tok)
    torch.manual_seed(3)
    tokens, _, logprobs = sample_completions(
        model, prompts, 4, SamplingConfig(max_new_tokens=10, temperature=0.8), ends, tok.pad_token_id
    )
    assert len({tuple(t) for t in tokens[:4]}) > 1, "four samples of one prompt should not all be equal"
    for row, ids in enumerate(tokens):
        seq = torch.tensor([prompts[row // 4] + ids])
        with torch.no_grad():
            logits = model(seq).logits[0, -len(ids) - 1 : -1].float() / 0.8
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logprobs[row]), expected, atol=1e-4, rtol=0)


def test_same_seed_same_samples(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts, ends = _prompts(tok), end_token_ids(model, tok)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(sample_completions(model, prompts, 2, sampling, ends, tok.pad_token_id)[0])
    assert runs[0] == runs[1]


def test_top_k_and_top_p_keep_exactly_the_nucleus():
    # Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 (log-space logits).
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]])).repeat(4000, 1)
    torch.manual_seed(0)
    seen_k = set(choose_tokens(logits, SamplingConfig(temperature=1.0, top_k=2))[0].tolist())
    seen_p = set(choose_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7))[0].tolist())
    seen_all = set(choose_tokens(logits, SamplingConfig(temperature=1.0))[0].tolist())
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.7, so the second token is needed; 0.75 >= 0.7, so the third is not
    assert seen_all == {0, 1, 2, 3, 4}
    token, logprob = choose_tokens(logits[:3], SamplingConfig(temperature=0.0))
    assert token.tolist() == [0, 0, 0]
    torch.testing.assert_close(logprob, torch.log(torch.tensor([0.5] * 3)))
    # The recorded log-prob is the untruncated one at the temperature, even with top-k on.
    _, logprob = choose_tokens(logits[:5], SamplingConfig(temperature=1.0, top_k=1))
    torch.testing.assert_close(logprob, torch.log(torch.tensor([0.5] * 5)))


def _warper_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The sampling distribution by the mask rule over the whole sorted vocabulary (transformers' warpers)."""
    scaled = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scaled, sampling.top_k).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, (probs.cumsum(-1) - probs) >= sampling.top_p)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.softmax(scaled, dim=-1)


@pytest.mark.parametrize(
    "case",
    [
        "nucleus among the candidates",
        "nucleus wider than the candidates",
        "top-k with a tie at the cut",
        "top-k then top-p",
    ],
)
def test_choose_tokens_samples_the_warpers_distribution(case):
    from mgrpo_pl.rollout.engines.cpu.decoding import NUCLEUS_CANDIDATES

    vocab = NUCLEUS_CANDIDATES + 100
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, vocab, generator=gen)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9)
    if case == "nucleus wider than the candidates":
        vocab = 2 * NUCLEUS_CANDIDATES
        logits = torch.randn(1, vocab, generator=gen) * 0.3  # nearly flat: the nucleus is most of the vocabulary
    elif case == "nucleus among the candidates":
        logits[:, 100:106] += torch.tensor([9.0, 8.5, 8.0, 7.5, 7.0, 6.0])  # a peaked row: a handful of tokens
    elif case == "top-k with a tie at the cut":
        logits[:, 7:10] = 6.0  # ranks 1-3 tie; top_k=2 keeps all three
        logits[:, 3] = 7.0
        sampling = SamplingConfig(temperature=1.0, top_k=2)
    elif case == "top-k then top-p":
        logits[:, 10:15] += torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0])
        sampling = SamplingConfig(temperature=1.0, top_k=4, top_p=0.8)
    expected = _warper_probs(logits, sampling)
    draws = 20_000
    torch.manual_seed(0)
    tokens, logprobs = choose_tokens(logits.repeat_interleave(draws, dim=0), sampling)
    torch.testing.assert_close(
        logprobs,
        torch.log_softmax(logits / sampling.temperature, -1)
        .repeat_interleave(draws, 0)
        .gather(1, tokens[:, None])
        .squeeze(1),
    )
    freq = torch.bincount(tokens, minlength=vocab).float() / draws
    assert bool((freq[expected[0] == 0] == 0).all()), "a token outside the top-k/top-p set was drawn"
    # Per token, a standard error of at most 0.0036 at 20,000 draws.
    torch.testing.assert_close(freq, expected[0], atol=0.015, rtol=0)
    if case == "nucleus wider than the candidates":
        # Per-token errors are small here; the mass beyond the likeliest NUCLEUS_CANDIDATES tokens is not.
        likeliest = torch.topk(expected[0], NUCLEUS_CANDIDATES).indices
        outside = torch.ones(vocab, dtype=torch.bool).index_fill(0, likeliest, False)
        assert float(expected[0][outside].sum()) > 0.2
        assert abs(float(freq[outside].sum() - expected[0][outside].sum())) < 0.02


def test_sample_rows_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    torch.manual_seed(0)
    draws = sample_rows(probs.repeat_interleave(50_000, dim=0)).view(2, -1)
    for row, expected in zip(draws, probs):
        freq = torch.bincount(row, minlength=6).float() / row.numel()
        assert freq[expected == 0].sum() == 0
        # 50,000 draws: a standard error of at most 0.0023 per entry.
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_sample_rows_at_the_top_of_the_range_takes_the_last_possible_entry(monkeypatch):
    # u * total rounding up to the total itself must not select a trailing entry of probability 0 (or index V).
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, **kw))
    assert sample_rows(probs).tolist() == [1, 2]


def test_reserved_layer_equals_concatenation_through_growth_and_reindexing():
    layer, keys = _ReservedLayer(reserve=2), []
    for width in (3, 1, 1, 1, 4, 1):  # grows past the reserve twice
        k, v = torch.randn(2, 1, width, 4), torch.randn(2, 1, width, 4)
        got_k, got_v = layer.update(k, v)
        keys.append((k, v))
        torch.testing.assert_close(got_k, torch.cat([a for a, _ in keys], dim=-2))
        torch.testing.assert_close(got_v, torch.cat([b for _, b in keys], dim=-2))
    assert layer.get_seq_length() == 11
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([3, 0]))
    full_k = torch.cat([a for a, _ in keys], dim=-2)
    torch.testing.assert_close(layer.keys, full_k[[1, 0]])
    k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    torch.testing.assert_close(layer.update(k, v)[0], torch.cat([full_k[[1, 0]], k], dim=-2))


def test_empty_prompt_is_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="empty prompt"):
        sample_completions(model, [[1, 2], []], 1, SamplingConfig(max_new_tokens=2), [0], tok.pad_token_id)
    assert sample_completions(model, [], 2, SamplingConfig(max_new_tokens=2), [0], tok.pad_token_id) == ([], [], [])
