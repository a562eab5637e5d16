"""The memory-saving SwiGLU MLP: the same gradients as the stock autograd, fewer saved tensors, safe fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mgrpo_pl.modeling.swiglu import SwiGLU, SwiGLUDown, patch_swiglu_mlps


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    # Untouched random weights are too small to make the MLP matter; shake them so every gradient is informative.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _loss_grads_saved(model: nn.Module, ids: torch.Tensor, autocast: bool = False):
    """Loss, every parameter's gradient, and the bytes of the (non-parameter) tensors autograd saved."""
    model.zero_grad(set_to_none=True)
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved.values())


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-12)) for n in a)


def test_gradcheck_of_both_functions():
    g = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (g, u))
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (g, u, w))


def test_patched_model_has_the_same_loss_and_gradients_and_saves_two_intermediates_fewer(tiny):
    patched = copy.deepcopy(tiny)
    layers = tiny.config.num_hidden_layers
    assert patch_swiglu_mlps(patched) == layers
    ids = torch.randint(0, tiny.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    loss0, grads0, saved0 = _loss_grads_saved(tiny, ids)
    loss1, grads1, saved1 = _loss_grads_saved(patched, ids)
    assert torch.equal(loss0, loss1)
    assert _max_rel(grads0, grads1) < 1e-5
    # silu(gate) and the product are no longer kept: two float32 [tokens, intermediate] tensors per layer.
    intermediate = ids.numel() * tiny.config.intermediate_size * 4
    assert saved0 - saved1 == 2 * layers * intermediate


def test_bf16_autocast_gradients_are_as_close_to_float32_as_the_stock_ones(tiny):
    patched = copy.deepcopy(tiny)
    patch_swiglu_mlps(patched)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    _, exact, _ = _loss_grads_saved(tiny, ids)
    _, stock, _ = _loss_grads_saved(tiny, ids, autocast=True)
    _, ours, _ = _loss_grads_saved(patched, ids, autocast=True)
    assert all(g.dtype == torch.float32 for g in ours.values())
    assert _max_rel(exact, ours) <= 1.2 * _max_rel(exact, stock)


def test_a_hooked_down_projection_is_still_called_as_a_module(tiny):
    """DeepSpeed ZeRO-3 gathers a weight in a forward pre-hook: the fused path must not bypass it."""
    patched = copy.deepcopy(tiny)
    patch_swiglu_mlps(patched)
    calls = []
    for layer in patched.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: calls.append(module))
    ids = torch.randint(0, tiny.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    _, grads0, _ = _loss_grads_saved(tiny, ids)
    _, grads1, _ = _loss_grads_saved(patched, ids)
    assert len(calls) == tiny.config.num_hidden_layers
    assert _max_rel(grads0, grads1) < 1e-5


def test_without_gradients_the_output_is_the_stock_one(tiny):
    patched = copy.deepcopy(tiny)
    patch_swiglu_mlps(patched)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(tiny(input_ids=ids).logits, patched(input_ids=ids).logits)


def test_a_deep_copy_runs_on_its_own_weights(tiny):
    patched = copy.deepcopy(tiny)
    patch_swiglu_mlps(patched)
    twin = copy.deepcopy(patched)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, tiny.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    x = patched.model.embed_tokens(ids).requires_grad_(True)
    assert twin.model.layers[0].mlp(x).abs().max() == 0
    assert patched.model.layers[0].mlp(x).abs().max() > 0


def test_only_silu_mlps_of_known_classes_are_patched():
    def llama(act: str) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            hidden_act=act,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    assert patch_swiglu_mlps(llama("silu")) == 2
    assert patch_swiglu_mlps(llama("gelu")) == 0
    assert patch_swiglu_mlps(nn.Sequential(nn.Linear(4, 4))) == 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_through_the_patched_mlp(tiny, use_reentrant):
    """configs/paper.yaml turns gradient checkpointing on: the recomputed forward must take the same path."""
    patched = copy.deepcopy(tiny)
    patch_swiglu_mlps(patched)
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    patched.train()
    assert patched.is_gradient_checkpointing
    ids = torch.randint(0, tiny.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    _, grads0, _ = _loss_grads_saved(tiny, ids)
    _, grads1, _ = _loss_grads_saved(patched, ids)
    assert _max_rel(grads0, grads1) < 1e-5
