"""LoRA policies with peft: the adapters train, the base stays frozen and doubles as the reference.

``add_lora`` injects peft's LoRA layers into the Hugging Face model in place and returns the ``PeftModel`` wrapper;
the module keeps training, sharding and generating with the Hugging Face model itself (its ``model.layers`` and
``lm_head`` are unchanged, only some ``nn.Linear`` became ``lora.Linear``), so every layout and engine works as for
full fine-tuning. The wrapper is kept for what only it offers: ``disable_adapter`` (the reference's log-probs),
``save_pretrained`` of the adapter and ``merge_and_unload`` for export.

``merged_weights`` yields the policy's weights under the base model's names with each adapter folded in
(``W + scale * B @ A``), computed out of place: pushing them to an engine leaves the trained base bit-identical,
where peft's in-place ``merge``/``unmerge`` would add and subtract the delta in float and drift.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from peft import PeftModel

    from mgrpo_pl.settings import LoraSettings

ADAPTER = "default"  # peft's name of the one adapter a run trains


def add_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Inject LoRA adapters into ``model`` (in place) and freeze every other weight; returns peft's wrapper."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, adapter_name=ADAPTER)


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def base_name(name: str) -> str:
    """A parameter's name in the plain model: peft's ``.base_layer`` level removed."""
    return name.replace(".base_layer.", ".")


def merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The weights of ``model`` (the Hugging Face model holding LoRA layers) as a plain model's, adapters folded in.

    Yields one tensor at a time under the base model's parameter names; adapter weights themselves are not yielded.
    """
    owners = {f"{name}.base_layer.weight": module for name, module in model.named_modules() if is_lora_layer(module)}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        tensor = _whole(param.detach())
        module = owners.get(name)
        if module is not None and ADAPTER in module.lora_A and not module.merged:
            tensor = tensor + delta_weight(module).to(tensor.dtype)
        yield base_name(name), tensor


def _whole(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # an FSDP2 shard: gathered


@torch.no_grad()
def delta_weight(module: nn.Module) -> Tensor:
    """LoRA's update of one linear, ``(alpha / r) * B @ A``, from whole tensors.

    Written out rather than through peft's ``get_delta_weight``: on FSDP2 shards that would run as a DTensor matmul;
    here the two small factors are gathered whole and multiplied locally.
    """
    a = _whole(module.lora_A[ADAPTER].weight.detach())
    b = _whole(module.lora_B[ADAPTER].weight.detach())
    delta = (b @ a) * module.scaling[ADAPTER]
    return delta.T if getattr(module, "fan_in_fan_out", False) else delta


def strip_adapters(model: nn.Module) -> nn.Module:
    """``model`` (a copy: it is changed in place) as a plain model: each LoRA layer replaced by its base linear with
    the adapter folded into the weight. An engine's private copy then has the base model's names, which is what
    ``merged_weights`` pushes."""
    layers = [(name, module) for name, module in model.named_modules() if is_lora_layer(module)]
    for name, module in layers:
        base = module.base_layer
        if ADAPTER in module.lora_A and not module.merged:
            with torch.no_grad():
                base.weight.add_(delta_weight(module).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model


def drop_frozen(state: dict[str, Tensor], model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """``state`` without the frozen parameters of ``model`` (named ``prefix + name`` there)."""
    # remove_duplicate=False: a tied head (lm_head.weight, the embedding's tensor) is a state-dict entry of its own.
    named = model.named_parameters(remove_duplicate=False)
    frozen = {prefix + name for name, param in named if not param.requires_grad}
    return {key: value for key, value in state.items() if key not in frozen}


def fill_frozen(state: dict[str, Tensor], model: nn.Module, prefix: str) -> None:
    """Add the frozen parameters of ``model`` that ``state`` lacks (a checkpoint written by ``drop_frozen``)."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            state.setdefault(prefix + name, param.detach())
