"""The weight-major linear used while decoding on a CPU: same outputs, scoped to the block, stock path elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgrpo_pl.rollout.row_linear import MAX_ROWS, weight_major_linears


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 24, bias=False))


@pytest.mark.parametrize("shape", [(1, 48), (5, 1, 48), (MAX_ROWS, 48), (MAX_ROWS + 1, 48), (3, 7, 48)])
def test_outputs_equal_the_stock_linear(shape):
    net = _net()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = net(x)
        with weight_major_linears(net) as patched:
            got = net(x)
    assert patched == 2
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_patch_is_taken_by_the_layers_and_removed_after_the_block_even_on_error():
    net = _net()
    calls = []
    original = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    x = torch.randn(4, 48)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with weight_major_linears(net):
            torch.mm = counting_mm
            try:
                net(x)
            finally:
                torch.mm = original
            raise RuntimeError("boom")
    assert [tuple(s) for s in calls] == [(96, 48), (24, 96)]  # the weight is the left operand
    assert all("forward" not in vars(layer) for layer in net if isinstance(layer, nn.Linear))


def test_gradients_and_other_dtypes_take_the_stock_path():
    net = _net()
    x = torch.randn(4, 48, requires_grad=True)
    with weight_major_linears(net):
        y = net(x)  # grad enabled: F.linear, so autograd is untouched
        y.sum().backward()
    assert x.grad is not None
    half = _net().to(torch.bfloat16)
    with weight_major_linears(half) as patched:
        assert patched == 0
