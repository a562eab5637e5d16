"""What an engine gets from a LoRA policy: the base weights with ``scale * B @ A`` folded in, under the base names."""

import pytest
import torch

from mgrpo_pl.modeling.loading import load_causal_lm
from mgrpo_pl.modeling.lora import add_lora, merged_weights, strip_adapters
from mgrpo_pl.rollout.engines.transformers import cast_copy
from mgrpo_pl.settings import LoraSettings

R, ALPHA = 4, 8.0


@pytest.fixture()
def policy(tiny_model_path):
    model = load_causal_lm(tiny_model_path)
    add_lora(model, LoraSettings(r=R, alpha=ALPHA))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_merged_weights_are_base_plus_scaled_b_times_a(policy, tiny_model_path):
    plain = dict(load_causal_lm(tiny_model_path).named_parameters())
    merged = dict(merged_weights(policy))
    assert merged.keys() == plain.keys()
    params = dict(policy.named_parameters())
    name = "model.layers.0.self_attn.q_proj"
    a, b = params[f"{name}.lora_A.default.weight"], params[f"{name}.lora_B.default.weight"]
    want = plain[f"{name}.weight"] + (ALPHA / R) * b @ a  # LoRA: W + (alpha / r) B A
    torch.testing.assert_close(merged[f"{name}.weight"], want, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])  # no adapter there
    # Out of place: the policy's own base weight is untouched.
    assert torch.equal(params[f"{name}.base_layer.weight"], plain[f"{name}.weight"])


def test_an_engine_copy_is_a_plain_model_that_computes_what_the_policy_does(policy):
    copy = cast_copy(policy, torch.float32)
    assert not any("lora" in name for name, _ in copy.named_parameters())
    assert copy.state_dict().keys() == dict(merged_weights(policy)).keys() | {"lm_head.weight"}
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, policy(ids).logits, rtol=0, atol=1e-5)
    assert strip_adapters(torch.nn.Linear(2, 2)) is not None  # a model without adapters passes through
