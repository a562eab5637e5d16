"""FSDP1 with a backward inside the root's forward (what Lightning's FSDPStrategy does to MGRPOModule's manual
steps), on the CPU with gloo in one process: which wrapping fails, which works, and that the check tells them apart.

Lightning refuses FSDPStrategy on a CPU, so the root here wraps a plain holder module, as Lightning wraps the
LightningModule; the policy is the real tiny Qwen2.
"""

import pytest
import torch
from torch import nn

from mgrpo_pl.distributed import check_fsdp1_wrapping, fsdp1_root_parameters
from mgrpo_pl.modeling.loading import load_causal_lm

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


class Holder(nn.Module):
    """Plays the LightningModule: its forward is a training step that runs backward per micro-batch."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, ids: torch.Tensor) -> None:
        for rows in ids.chunk(2):
            self.policy(input_ids=rows).logits.float().logsumexp(-1).mean().backward()


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _wrapped(tiny_model_path, with_policy_class: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    policy = load_causal_lm(str(tiny_model_path))
    layer = type(policy.model.layers[0])
    classes = {layer, type(policy)} if with_policy_class else {layer}
    root = FullyShardedDataParallel(
        Holder(policy), auto_wrap_policy=ModuleWrapPolicy(classes), device_id=torch.device("cpu"), use_orig_params=True
    )
    return root, policy


def test_decoder_layers_alone_leave_parameters_in_the_root_and_backward_fails(process_group, tiny_model_path):
    root, policy = _wrapped(tiny_model_path, with_policy_class=False)
    owned = fsdp1_root_parameters(root)
    assert any("embed_tokens" in name for name in owned)
    with pytest.raises(ValueError, match=r"auto_wrap_policy.*Qwen2ForCausalLM"):
        check_fsdp1_wrapping(root, policy)
    with pytest.raises(AssertionError, match="BACKWARD_PRE"):  # what the check spares the user
        root(torch.randint(0, 100, (4, 6)))


def test_the_policy_class_as_a_unit_trains(process_group, tiny_model_path):
    root, policy = _wrapped(tiny_model_path, with_policy_class=True)
    assert fsdp1_root_parameters(root) == []
    check_fsdp1_wrapping(root, policy)
    root(torch.randint(0, 100, (4, 6)))
    grads = [p.grad for p in root.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_anything_but_an_fsdp1_root_passes(tiny_model_path):
    check_fsdp1_wrapping(None, nn.Linear(2, 2))
    check_fsdp1_wrapping(Holder(nn.Linear(2, 2)), nn.Linear(2, 2))
