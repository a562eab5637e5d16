"""The transformers engine: batching, end tokens, behaviour log-probs, and the weight-refresh path."""

import pytest
import torch

from mgrpo_pl.algo.logprobs import token_logprobs
from mgrpo_pl.method import encode_prompt
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
from mgrpo_pl.rollout.engines import TransformersEngine, build_engine, param_checksum
from mgrpo_pl.rollout.types import SamplingConfig


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_path):
    torch.manual_seed(0)
    return load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))


def _prompts(tokenizer):
    return [encode_prompt(tokenizer, q, "Answer in \\boxed{}.") for q in ("What is 2 + 3?", "What is 10 * 4 minus 7?")]


def test_shapes_order_and_end_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = TransformersEngine(model, tok)
    out = engine.generate(_prompts(tok), SamplingConfig(max_new_tokens=12, temperature=1.0), n=3)
    assert len(out) == 6 and len(out.texts) == 6 and len(out.finished) == 6
    for ids, fin, lp in zip(out.token_ids, out.finished, out.logprobs):
        assert 0 < len(ids) <= 12
        assert len(lp) == len(ids)
        # finished <=> the last token ends the turn, and no end token appears earlier.
        assert fin == (ids[-1] in engine.end_ids)
        assert not any(t in engine.end_ids for t in ids[:-1])


def test_behaviour_logprobs_match_a_trainer_forward(model_and_tokenizer):
    """The recorded log-probs equal log softmax(logits / T) of the sampled tokens recomputed with one forward pass."""
    model, tok = model_and_tokenizer
    engine = TransformersEngine(model, tok)
    temperature = 0.7
    prompts = _prompts(tok)
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=temperature), n=2)
    for row, ids in enumerate(out.token_ids):
        seq = torch.tensor([prompts[row // 2] + ids])
        with torch.no_grad():
            logits = model(seq).logits
        expected = token_logprobs(logits[:, :-1], seq[:, 1:], temperature=temperature)[0, -len(ids) :]
        torch.testing.assert_close(torch.tensor(out.logprobs[row]), expected, atol=1e-4, rtol=0)


def test_greedy_is_batch_invariant(model_and_tokenizer):
    """Left padding and sorting by length must not change what a prompt generates."""
    model, tok = model_and_tokenizer
    engine = TransformersEngine(model, tok)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    prompts = _prompts(tok)
    together = engine.generate(prompts, greedy).token_ids
    alone = [engine.generate([p], greedy).token_ids[0] for p in prompts]
    assert together == alone


def test_private_copy_is_refreshed_by_update_weights(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = TransformersEngine(model, tok, share_weights=False)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    prompts = _prompts(tok)
    before = engine.generate(prompts, greedy).token_ids
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        policy_sum = param_checksum(model.named_parameters())
        assert engine.weights_checksum() != policy_sum
        stale = engine.generate(prompts, greedy).token_ids
        assert stale == before
        engine.update_weights(model.named_parameters())
        assert engine.weights_checksum() == policy_sum
        reference = TransformersEngine(model, tok).generate(prompts, greedy).token_ids
        assert engine.generate(prompts, greedy).token_ids == reference
    finally:
        model.load_state_dict(original)


def test_unknown_engine_and_unknown_parameter(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine("sglang", model, tok)
    engine = TransformersEngine(model, tok, share_weights=False)
    with pytest.raises(KeyError, match="no parameter"):
        engine.update_weights([("not.a.weight", torch.zeros(1))])


def test_engine_in_another_dtype_samples_from_a_cast_copy(model_and_tokenizer):
    """``dtype="bfloat16"`` on an fp32 policy: a private bf16 copy (ties kept, buffers untouched), sampling close to
    the policy's distribution, and refreshed by casting on every push."""
    model, tok = model_and_tokenizer
    engine = TransformersEngine(model, tok, dtype="bfloat16")
    assert not engine.shared
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy itself is not touched
    assert all(p.requires_grad for p in model.parameters())
    policy_buffers = dict(model.named_buffers())
    assert all(b.dtype == policy_buffers[n].dtype for n, b in engine.model.named_buffers())
    if model.config.tie_word_embeddings:
        assert engine.model.get_output_embeddings().weight is engine.model.get_input_embeddings().weight

    temperature, prompts = 1.0, _prompts(tok)
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=temperature), n=2)
    gaps = []
    for row, ids in enumerate(out.token_ids):
        seq = torch.tensor([prompts[row // 2] + ids])
        with torch.no_grad():
            fp32 = token_logprobs(model(seq).logits[:, :-1], seq[:, 1:], temperature=temperature)[0, -len(ids) :]
            bf16 = token_logprobs(engine.model(seq).logits[:, :-1], seq[:, 1:], temperature=temperature)[0, -len(ids) :]
        # The recorded log-probs are the bf16 copy's own; the fp32 policy's differ by bf16 rounding only.
        torch.testing.assert_close(torch.tensor(out.logprobs[row]), bf16.float(), atol=2e-2, rtol=0)
        gaps.append((bf16 - fp32).abs().max().item())
    assert 0 < max(gaps) < 0.1

    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        engine.update_weights(model.named_parameters())
        cast = [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]
        assert engine.weights_checksum() == param_checksum(cast)
    finally:
        model.load_state_dict(original)


def test_engine_dtype_errors_name_the_option(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="share_weights: false"):
        TransformersEngine(model, tok, share_weights=True, dtype="bfloat16")
    for bad in ("int8", "bfloat17"):
        with pytest.raises(ValueError, match=f"engine dtype '{bad}'"):
            TransformersEngine(model, tok, dtype=bad)
    # The policy's own dtype asks for nothing: the engine shares the policy.
    assert TransformersEngine(model, tok, dtype="float32").shared
