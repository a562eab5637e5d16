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


def _mlp(bias: bool = False) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu", mlp_bias=bias)
    mlp = LlamaMLP(config)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(std=0.2)
    return mlp


@pytest.mark.parametrize("shape", [(1, 1, 32), (MAX_ROWS, 1, 32), (3, 5, 32), (MAX_ROWS + 1, 32)])
def test_swiglu_mlp_is_taken_whole_and_gives_the_stock_output(shape):
    mlp = _mlp()
    x = torch.randn(*shape)
    calls = []
    original = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    with torch.no_grad():
        expected = mlp(x)
        with weight_major_linears(mlp):
            torch.mm = counting_mm
            try:
                got = mlp(x)
            finally:
                torch.mm = original
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Within the row limit all three weights are left operands; above it the stock linears run (no torch.mm).
    assert calls == ([(80, 32), (80, 32), (32, 80)] if shape[0] * shape[1] <= MAX_ROWS else [])


def test_swiglu_mlp_declines_biases_and_hooks_and_restores_an_instance_forward():
    from mgrpo_pl.modeling.swiglu import patch_swiglu_mlps

    x = torch.randn(4, 32)
    biased = _mlp(bias=True)
    with torch.no_grad():
        expected = biased(x)
        with weight_major_linears(biased):
            torch.testing.assert_close(biased(x), expected, rtol=1e-5, atol=1e-6)
    hooked, seen = _mlp(), []
    hooked.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad(), weight_major_linears(hooked):
        hooked(x)
    assert seen == [torch.Size([4, 32])]  # the hooked projection was called as a module
    trained = _mlp()
    patch_swiglu_mlps(trained)
    own = vars(trained)["forward"]
    with weight_major_linears(trained):
        assert vars(trained)["forward"] is not own
        y = trained(torch.randn(4, 32, requires_grad=True))  # gradients: the training MLP's own forward
        assert y.grad_fn is not None and "SwiGLU" in type(y.grad_fn).__name__
    assert vars(trained)["forward"] is own
    plain = _mlp()
    with weight_major_linears(plain):
        pass
    assert "forward" not in vars(plain)
