"""Chunked token log-probs and entropies against the plain full-vocabulary log_softmax."""

from __future__ import annotations

import math

import pytest
import torch

from mgrpo_pl.algo import token_entropy, token_logprobs
from mgrpo_pl.algo.logprobs import _ChunkedTokenLogprobs


def _reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _random(b: int = 5, t: int = 7, v: int = 13, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen) * 2.0
    tokens = torch.randint(0, v, (b, t), generator=gen)
    return logits, tokens


def test_hand_computed_values() -> None:
    # logits [0, ln 3]: softmax = [1/4, 3/4], so log p(token 1) = ln 0.75 = -0.28768207.
    # At temperature 2: logits / 2 = [0, ln(3)/2] = [0, ln sqrt(3)], p(token 1) = sqrt(3) / (1 + sqrt(3)) = 0.6339746.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    assert token_logprobs(logits, tokens).item() == pytest.approx(math.log(0.75), abs=1e-6)
    expected_t2 = math.log(math.sqrt(3.0) / (1.0 + math.sqrt(3.0)))
    assert expected_t2 == pytest.approx(math.log(0.6339746), abs=1e-6)
    assert token_logprobs(logits, tokens, temperature=2.0).item() == pytest.approx(expected_t2, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_matches_log_softmax_gather(temperature: float) -> None:
    logits, tokens = _random()
    out = token_logprobs(logits, tokens, temperature=temperature)
    assert out.shape == (5, 7)
    assert out.dtype == torch.float32
    # rtol 1e-6 is a few float32 ulps at log-probs around -10, where one ulp is already ~1e-6.
    torch.testing.assert_close(out, _reference(logits, tokens, temperature), atol=1e-6, rtol=1e-6)


def test_chunk_sizes_give_identical_results() -> None:
    logits, tokens = _random()
    outs = [token_logprobs(logits, tokens, temperature=0.7, chunk_size=c) for c in (1, 3, 4, 5, 50)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-7, rtol=0)


def test_bf16_input_is_computed_in_float32() -> None:
    logits, tokens = _random()
    logits = logits.bfloat16()
    out = token_logprobs(logits, tokens, temperature=0.7, chunk_size=2)
    assert out.dtype == torch.float32
    # The reference upcasts the same bf16 values, so only float32 rounding separates the two.
    torch.testing.assert_close(out, _reference(logits, tokens, 0.7), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 50])
def test_gradient_matches_unchunked(chunk_size: int) -> None:
    logits, tokens = _random(seed=1)
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    (token_logprobs(ours, tokens, temperature=0.7, chunk_size=chunk_size) * weights).sum().backward()
    (_reference(ref, tokens, 0.7) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-6, rtol=0)


def test_bf16_gradient_matches_unchunked() -> None:
    logits, tokens = _random(seed=3)
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    ours = logits.bfloat16().requires_grad_(True)
    ref = logits.bfloat16().requires_grad_(True)
    (token_logprobs(ours, tokens, chunk_size=2) * weights).sum().backward()
    (_reference(ref, tokens) * weights).sum().backward()
    assert ours.grad.dtype == torch.bfloat16
    # Both compute the float32 gradient and round it to bf16 once; allow one bf16 ulp (2^-8 relative).
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), atol=1e-6, rtol=2**-8)


def test_backward_passes_gradcheck_in_float64() -> None:
    logits, tokens = _random(b=3, t=2, v=5, seed=5)
    logits = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _ChunkedTokenLogprobs.apply(x, tokens, 0.7, 2), (logits,))


def test_saves_no_float32_copy_of_the_whole_vocabulary() -> None:
    # For bf16 logits, the only large tensor autograd may keep is the bf16 input itself; any float32 [B, T, V]
    # (or a stack of per-chunk float32 copies) would show up here.
    logits, tokens = _random(b=8, t=4, v=32)
    logits = logits.bfloat16().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(logits, tokens, chunk_size=2).sum().backward()
    float32_numel = sum(t.numel() for t in saved if t.dtype == torch.float32)
    assert float32_numel < 2 * 4 * 32  # less than one chunk of float32 logits
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises(temperature: float) -> None:
    logits, tokens = _random()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, temperature=temperature)


def test_bad_shapes_and_chunk_size_raise() -> None:
    logits, tokens = _random()
    with pytest.raises(ValueError, match="tokens shape"):
        token_logprobs(logits, tokens[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, tokens, chunk_size=0)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        token_logprobs(logits[0], tokens[0])


def test_entropy_hand_computed() -> None:
    # Uniform over 4: H = ln 4 = 1.3862944.
    # logits [0, ln 3]: p = [0.25, 0.75], H = 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351.
    # logits [0, 0, -inf]: p = [0.5, 0.5, 0], H = ln 2 = 0.6931472 (the -inf entry must not make NaN).
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9], [0.0, 0.0, -math.inf, -math.inf]]])
    out = token_entropy(logits)
    expected = torch.tensor([[math.log(4.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0), math.log(2.0)]])
    assert expected[0, 1].item() == pytest.approx(0.5623351, abs=1e-6)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 50])
def test_entropy_matches_full_softmax(chunk_size: int) -> None:
    logits, _ = _random()
    logits.requires_grad_(True)
    out = token_entropy(logits.bfloat16(), temperature=0.7, chunk_size=chunk_size)
    logp = torch.log_softmax(logits.bfloat16().float() / 0.7, dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    assert out.dtype == torch.float32
    assert not out.requires_grad
    torch.testing.assert_close(out, expected.detach(), atol=1e-6, rtol=1e-6)
