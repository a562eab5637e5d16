"""Decoding on a CPU: compute a few rows through a linear layer as ``(W @ x^T)^T`` instead of ``x @ W^T``.

A decode step pushes one token per live row through every linear layer: ``F.linear`` with an input of 8 to 64 rows.
On the CPU, oneDNN/MKL's kernel for that shape (a thin left operand times a transposed weight) runs far below the
machine's matrix-multiply rate, while the same product taken with the weight as the left operand does not. Measured
on the 2-core benchmark machine in float32: with 32 rows, ``512 -> 4096`` took 1.7 ms as ``F.linear`` and 0.9 ms as
``W @ x^T``; with 16 rows 1.5 ms against 0.6 ms; from 96 rows on the two are equal. A whole
layer-1 rollout of the benchmark (32 rows, 64 new tokens) went from 3.0 s to 2.1-2.3 s with the same samples.

A SwiGLU MLP (:func:`~mgrpo_pl.modeling.swiglu.is_swiglu_mlp`) is taken whole in the same layout: ``W_gate @ x^T``
and ``W_up @ x^T`` stay [I, rows], the activation and product run on them in place, and only ``W_down``'s [H, rows]
output is transposed back. Each linear on its own would have to copy its [rows, I] output to a contiguous one (the
attention's ``.view()`` needs that; elementwise ops on the transposed layout were slower still): for the benchmark's
64-row layer-2 groups, the copies took 0.14 s of a 4.2 s rollout.

The product is the same sum in another order (float32 rounding aside), so the sampled tokens and behaviour
log-probs are those of ``F.linear``. The patch is an instance attribute on each plain ``nn.Linear`` for the duration
of the ``with`` block only; a policy that the trainer shares with the engine is back to its own forwards before any
training step.

Where PyTorch has oneDNN (the x86 wheels do), the block takes a faster path instead: each linear's weight is
reordered once into oneDNN's blocked layout when the block opens, and every call without gradients runs oneDNN's
float32 inner-product kernel on it (``mkldnn::_linear_pointwise``, the op PyTorch's own CPU compiler emits for
frozen linears). Measured on the 2-core benchmark machine (an AMD EPYC with AVX-512) for the 30M benchmark model's 29
linears of one decode step: 13.1 ms with 32 rows, against 20.2 ms weight-major and 22.3 ms for ``F.linear``; 5.7
against 18.9 ms with 8 rows; and 183 against 139 GFLOP/s with 64 rows. The reorder takes ~21 ms for that model per
block, and the reordered copy lives only as long as the block. The sampled tokens of a layer-1 rollout were the same
as the weight-major path's and their log-probs within 4e-6; the rollout took 1.6-1.8 s instead of 2.2 s.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgrpo_pl.modeling.swiglu import is_swiglu_mlp, weight_is_direct

__all__ = ["MAX_ROWS", "decode_linears", "onednn_available"]

# Above this the stock kernel is as fast. Where the two cross moves between runs on the same machine (from 96 rows
# on in one, F.linear ahead at 64 rows for a 512 -> 4096 layer in another), and whole rollouts with a limit of 32,
# 48 or 64 took the same time within noise.
MAX_ROWS = 64


def _rows(x: Tensor) -> int:
    """How many rows ``x`` pushes through a linear layer, or 0 when the weight-major path does not apply."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if torch.is_grad_enabled() or not 0 < rows <= MAX_ROWS or x.dtype != torch.float32:
        return 0
    return rows


def _weight_major_forward(self: nn.Linear, x: Tensor) -> Tensor:
    rows = _rows(x)
    if not rows:
        return F.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
    if self.bias is not None:
        out = out + self.bias
    # Contiguous: the attention reshapes projections with .view().
    return out.reshape(*x.shape[:-1], out.shape[-1]).contiguous()


def _weight_major_mlp_forward(self: nn.Module, x: Tensor, stock: Callable[[Tensor], Tensor]) -> Tensor:
    rows = _rows(x)
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    # Checked at every call, as in the training MLP: bias, hooks and wrappers all take the module path.
    if not rows or not all(weight_is_direct(p) and _is_cpu_float32(p.weight) for p in projections):
        return stock(x)
    xt = x.reshape(rows, x.shape[-1]).t()
    hidden = torch.mm(self.gate_proj.weight, xt)  # [I, rows]
    F.silu(hidden, inplace=True).mul_(torch.mm(self.up_proj.weight, xt))
    out = torch.mm(self.down_proj.weight, hidden).t()
    return out.reshape(*x.shape[:-1], out.shape[-1]).contiguous()


def _packed_forward(self: nn.Linear, x: Tensor, packed: Tensor) -> Tensor:
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build runs oneDNN's float32 linear on a reordered weight, checked once on a tiny product
    against ``F.linear`` (a build without oneDNN, or one where the internal op is gone, takes the weight-major path)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight, x = torch.arange(6.0).reshape(2, 3), torch.ones(1, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return bool(torch.equal(out, F.linear(x, weight)))


def _is_cpu_float32(weight: Tensor | None) -> bool:
    return type(weight) is nn.Parameter and weight.device.type == "cpu" and weight.dtype == torch.float32


def _is_patchable_linear(module: nn.Module) -> bool:
    """A plain float32 CPU ``nn.Linear`` without an instance forward of its own (which a wrapper may have set)."""
    return type(module) is nn.Linear and "forward" not in vars(module) and _is_cpu_float32(module.weight)


@contextlib.contextmanager
def decode_linears(model: nn.Module, onednn: bool | None = None) -> Iterator[int]:
    """Within the block, the float32 CPU ``nn.Linear`` layers of ``model`` run calls without gradients on oneDNN's
    kernel with a reordered weight (``onednn``: default :func:`onednn_available`); without it, they take inputs of
    at most :data:`MAX_ROWS` rows as ``(W @ x^T)^T`` and SwiGLU MLPs take those whole in that layout. Yields how
    many linear layers were patched (0 off the CPU)."""
    if onednn is None:
        onednn = onednn_available()
    if onednn:
        with _packed_linears(model) as patched:
            yield patched
        return
    with _weight_major_linears(model) as patched:
        yield patched


@contextlib.contextmanager
def _packed_linears(model: nn.Module) -> Iterator[int]:
    patched: list[nn.Linear] = []
    try:
        for module in model.modules():
            if not _is_patchable_linear(module):
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
            module.forward = types.MethodType(functools.partial(_packed_forward, packed=packed), module)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # and with it the reordered weight


@contextlib.contextmanager
def _weight_major_linears(model: nn.Module) -> Iterator[int]:
    patched: list[nn.Linear] = []
    mlps: list[tuple[nn.Module, Callable[[Tensor], Tensor] | None]] = []
    try:
        for module in model.modules():
            if is_swiglu_mlp(module) and _is_cpu_float32(getattr(module.gate_proj, "weight", None)):
                # An instance forward already there (the training MLP's) serves the calls this path declines.
                own = vars(module).get("forward")
                stock = own if own is not None else types.MethodType(type(module).forward, module)
                module.forward = types.MethodType(functools.partial(_weight_major_mlp_forward, stock=stock), module)
                mlps.append((module, own))
            if not _is_patchable_linear(module):
                continue
            module.forward = types.MethodType(_weight_major_forward, module)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
        for module, own in mlps:
            if own is None:
                del module.forward
            else:
                module.forward = own
