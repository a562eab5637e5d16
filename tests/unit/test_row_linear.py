"""The linears used while decoding on a CPU (oneDNN on a reordered weight, or weight-major without oneDNN): same
outputs, scoped to the block, stock path elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgrpo_pl.rollout.engines.cpu import row_linear
from mgrpo_pl.rollout.engines.cpu.row_linear import MAX_ROWS, decode_linears, onednn_available


def weight_major(model: nn.Module):
    """The path taken where PyTorch has no oneDNN."""
    return decode_linears(model, onednn=False)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 24, bias=False))


@pytest.mark.parametrize("shape", [(1, 48), (5, 1, 48), (MAX_ROWS, 48), (MAX_ROWS + 1, 48), (3, 7, 48)])
def test_outputs_equal_the_stock_linear(shape):
    net = _net()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = net(x)
        with weight_major(net) as patched:
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
        with weight_major(net):
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
    with weight_major(net):
        y = net(x)  # grad enabled: F.linear, so autograd is untouched
        y.sum().backward()
    assert x.grad is not None
    half = _net().to(torch.bfloat16)
    with weight_major(half) as patched:
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
        with weight_major(mlp):
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
        with weight_major(biased):
            torch.testing.assert_close(biased(x), expected, rtol=1e-5, atol=1e-6)
    hooked, seen = _mlp(), []
    hooked.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad(), weight_major(hooked):
        hooked(x)
    assert seen == [torch.Size([4, 32])]  # the hooked projection was called as a module
    trained = _mlp()
    patch_swiglu_mlps(trained)
    own = vars(trained)["forward"]
    with weight_major(trained):
        assert vars(trained)["forward"] is not own
        y = trained(torch.randn(4, 32, requires_grad=True))  # gradients: the training MLP's own forward
        assert y.grad_fn is not None and "SwiGLU" in type(y.grad_fn).__name__
    assert vars(trained)["forward"] is own
    plain = _mlp()
    with weight_major(plain):
        pass
    assert "forward" not in vars(plain)


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear")


def test_onednn_is_found_on_the_x86_wheel_the_project_pins():
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        assert onednn_available()


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 48), (5, 1, 48), (MAX_ROWS + 1, 48), (3, 7, 48), (0, 48)])
def test_onednn_outputs_equal_the_stock_linear_and_run_on_the_reordered_weight(shape, monkeypatch):
    net = _net()
    x = torch.randn(*shape)
    reordered = []
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def counting_reorder(weight, *args):
        reordered.append(tuple(weight.shape))
        return reorder(weight, *args)

    with torch.no_grad():
        expected = net(x)
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", counting_reorder)
        with decode_linears(net) as patched:
            got = net(x)
    assert patched == 2 and reordered == [(96, 48), (24, 96)]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(layer) for layer in net if isinstance(layer, nn.Linear))


@needs_onednn
def test_onednn_block_leaves_gradients_to_autograd_and_sees_the_weights_of_its_own_opening():
    net = _net()
    x = torch.randn(4, 48, requires_grad=True)
    with decode_linears(net):
        y = net(x)  # grad enabled: F.linear on the live weight
        y.sum().backward()
    assert x.grad is not None and net[0].weight.grad is not None
    with torch.no_grad():
        net[0].weight.mul_(2.0)  # an optimizer step between two rollouts
        expected = net(x)
        with decode_linears(net):
            got = net(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    half = _net().to(torch.bfloat16)
    with decode_linears(half) as patched:
        assert patched == 0


def test_onednn_probe_declines_a_build_without_the_op(monkeypatch):
    def missing(*args, **kwargs):
        raise RuntimeError("No such operator mkldnn::_reorder_linear_weight")

    row_linear.onednn_available.cache_clear()
    try:
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
        assert not onednn_available()
        net = _net()
        with torch.no_grad(), decode_linears(net) as patched:  # the weight-major path, still exact
            got = net(torch.randn(4, 48))
        assert patched == 2 and got.shape == (4, 24)
    finally:
        monkeypatch.undo()
        row_linear.onednn_available.cache_clear()
