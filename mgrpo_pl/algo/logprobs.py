"""Per-token log-probabilities and entropies from language-model logits, without a float32 copy of the vocabulary.

The policy-gradient terms of the paper (the ratio ``pi_theta / pi_old`` of Eq. 3 and 6, and the KL of Eq. 2) need
``log pi(o_t | q, o_<t)`` for the sampled token only. With a vocabulary of ~150k, ``log_softmax(logits.float())`` on a
``[B, T, V]`` bf16 tensor materialises a float32 copy that is twice the size of the logits, plus the same again for
its saved activations. Here rows are processed ``chunk_size`` at a time: each chunk is upcast to float32, divided by
the sampling temperature, and ``logit[token] - logsumexp(logits)`` is taken. The backward pass recomputes the softmax
chunk by chunk too (a custom autograd function), so neither direction ever holds more than
``chunk_size * T * V`` extra float32 values besides the gradient of the logits itself.

The temperature must match the one used for sampling: the behaviour log-probs come from ``softmax(logits / T)``, so
the ratio is only 1 at step 0 if the trainer divides by the same T.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_entropy", "token_logprobs"]


def _check_args(logits: Tensor, temperature: float, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logsumexp over a large vocabulary loses several digits; float64 input is kept at float64.
    return torch.promote_types(dtype, torch.float32)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """``log_softmax(logits / temperature).gather(tokens)`` with chunked forward and recomputing backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int) -> Tensor:
        compute_dtype = _compute_dtype(logits.dtype)
        out = torch.empty(tokens.shape, dtype=compute_dtype, device=logits.device)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = logits[rows].to(compute_dtype) / temperature
            target = scaled.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
            out[rows] = target - torch.logsumexp(scaled, dim=-1)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, tokens = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        compute_dtype = _compute_dtype(logits.dtype)
        grad_logits = torch.empty_like(logits)
        # d/dx_v [x_k/T - logsumexp(x/T)] = (onehot_k(v) - softmax(x/T)_v) / T
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            probs = torch.softmax(logits[rows].to(compute_dtype) / ctx.temperature, dim=-1)
            g = grad_out[rows].to(compute_dtype).unsqueeze(-1)
            chunk_grad = (-probs).mul_(g)
            chunk_grad.scatter_add_(-1, tokens[rows].unsqueeze(-1), g)
            grad_logits[rows] = chunk_grad.div_(ctx.temperature)
        return grad_logits, None, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 4) -> Tensor:
    """Log-probability of each target token under ``softmax(logits / temperature)``.

    Args:
        logits: ``[B, T, V]`` logits in any float dtype (bf16 is fine), already aligned so that ``logits[:, t]``
            predicts ``tokens[:, t]`` (i.e. shifted by the caller).
        tokens: ``[B, T]`` long token ids in ``[0, V)``; padding positions must hold a valid id (e.g. 0) and be
            masked out by the caller.
        temperature: the sampling temperature, > 0.
        chunk_size: rows of the batch processed at once; trades speed for peak memory.

    Returns:
        ``[B, T]`` float32 log-probabilities. Gradients flow to ``logits`` (first-order only).

    Raises:
        ValueError: on a non-positive temperature or chunk size, or mismatched shapes.
    """
    _check_args(logits, temperature, chunk_size)
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal logits[:, :, 0] shape {tuple(logits.shape[:2])}"
        )
    out = _ChunkedTokenLogprobs.apply(logits, tokens.long(), float(temperature), int(chunk_size))
    return out.float()


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int = 4) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, for logging.

    Computed as ``-sum_v p_v log p_v`` from ``log_softmax(logits / temperature)``, chunk by chunk as in
    :func:`token_logprobs`; the shorter ``logsumexp(x) - sum_v p_v x_v`` would cancel two large numbers and lose the
    small entropies of peaked distributions. The result is detached: keeping a graph for it would hold every chunk's
    float32 softmax.

    Args:
        logits: ``[B, T, V]`` logits in any float dtype.
        temperature: the sampling temperature, > 0.
        chunk_size: rows of the batch processed at once.

    Returns:
        ``[B, T]`` float32 entropies in nats (detached).
    """
    _check_args(logits, temperature, chunk_size)
    compute_dtype = _compute_dtype(logits.dtype)
    out = torch.empty(logits.shape[:2], dtype=compute_dtype, device=logits.device)
    for start in range(0, logits.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        scaled = logits[rows].to(compute_dtype) / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        # A -inf logit (a masked vocabulary entry) has probability 0 and contributes 0, not 0 * -inf = NaN.
        out[rows] = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(dim=-1)
    return out.float()
