"""Decoding on a CPU: compute a few rows through a linear layer as ``(W @ x^T)^T`` instead of ``x @ W^T``.

A decode step pushes one token per live row through every linear layer: ``F.linear`` with an input of 8 to 64 rows.
On the CPU, oneDNN/MKL's kernel for that shape (a thin left operand times a transposed weight) runs far below the
machine's matrix-multiply rate, while the same product taken with the weight as the left operand does not. Measured
on the 2-core benchmark machine in float32: with 32 rows, ``512 -> 4096`` took 1.7 ms as ``F.linear`` and 0.9 ms as
``W @ x^T``; with 16 rows 1.5 ms against 0.6 ms; from 96 rows on the two are equal. A whole
layer-1 rollout of the benchmark (32 rows, 64 new tokens) went from 3.0 s to 2.1-2.3 s with the same samples.

The product is the same sum in another order (float32 rounding aside), so the sampled tokens and behaviour
log-probs are those of ``F.linear``. The patch is an instance attribute on each plain ``nn.Linear`` for the duration
of the ``with`` block only; a policy that the trainer shares with the engine is back to its own forwards before any
training step.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MAX_ROWS", "weight_major_linears"]

MAX_ROWS = 64  # above this the stock kernel is as fast (measured up to 128 rows)


def _weight_major_forward(self: nn.Linear, x: Tensor) -> Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if torch.is_grad_enabled() or not 0 < rows <= MAX_ROWS or x.dtype != torch.float32:
        return F.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
    if self.bias is not None:
        out = out + self.bias
    # Contiguous: the attention reshapes projections with .view().
    return out.reshape(*x.shape[:-1], out.shape[-1]).contiguous()


@contextlib.contextmanager
def weight_major_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, the float32 CPU ``nn.Linear`` layers of ``model`` take inputs of at most :data:`MAX_ROWS`
    rows, without gradients, as ``(W @ x^T)^T``; yields how many layers were patched (0 off the CPU)."""
    patched: list[nn.Linear] = []
    try:
        for module in model.modules():
            if type(module) is not nn.Linear or "forward" in vars(module):
                continue
            weight = module.weight
            if type(weight) is not nn.Parameter or weight.device.type != "cpu" or weight.dtype != torch.float32:
                continue
            module.forward = types.MethodType(_weight_major_forward, module)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
