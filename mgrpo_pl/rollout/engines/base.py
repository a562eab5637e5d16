"""The generation-engine interface: what the rollout asks of any engine.

Every engine takes already-tokenised prompts and returns completion token ids, texts and (when it can) behaviour
log-probs. Working in token ids rather than text matters for layer 2: its query is the layer-1 prompt and
completion *tokens* followed by a guide phrase, so re-tokenising decoded text can never shift what was sampled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mgrpo_pl.rollout.types import Generation, SamplingConfig


def param_checksum(named_tensors: Iterable[tuple[str, Tensor]]) -> float:
    """A cheap, order-sensitive fingerprint of a set of weights (for on-policy checks, not cryptography)."""
    total = 0.0
    for i, (_, tensor) in enumerate(named_tensors):
        t = tensor.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()  # a sharded (FSDP2 DTensor) parameter: every rank takes part, in the same order
        t = t.double()
        total += float(t.sum()) * (1.0 + 1e-3 * i) + float(t.abs().sum())
    return total


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a turn: the generation config's eos ids (chat models list their end-of-turn token
    there) plus the tokenizer's eos."""
    ids: list[int] = []
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.append(config_eos)
    elif config_eos:
        ids.extend(int(i) for i in config_eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


class GenerationEngine(ABC):
    """Generates completions for token-id prompts with the current policy weights.

    Attributes:
        end_ids: Token ids that end a turn; completions include the one that ended them.
        max_context: Longest prompt + completion the model takes, in tokens, or None when unknown.
        shared: True when the engine generates with the policy module itself: on-policy by construction, so the
            rollout skips fingerprinting its weights.
        lockstep: True when generation runs collectives across ranks, so a rank with nothing to generate must still
            make the same calls as the others.
    """

    end_ids: list[int]
    max_context: int | None = None
    shared: bool = False
    lockstep: bool = False

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int = 1) -> Generation:
        """Sample ``n`` completions per prompt; the result is prompt-major (``len(prompts) * n`` rows)."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load the policy's current weights (HF parameter names) into the engine, in place."""

    @abstractmethod
    def weights_checksum(self) -> float:
        """``param_checksum`` of the weights the engine generates with now."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release the engine's resources."""

    def place(self, device: torch.device, autocast_dtype: torch.dtype | None = None) -> None:  # noqa: B027
        """Follow the trainer: run on ``device`` (where Lightning put the policy) and, under a mixed-precision
        trainer, generate under ``torch.autocast`` with ``autocast_dtype``. Engines that own their device (vLLM)
        ignore it."""

    def reuse_prefixes(self) -> AbstractContextManager[None]:
        """A context in which later ``generate`` calls may reuse the keys and values of earlier calls' prompts and
        completions (layer 2's queries start with layer 1's sequences). The weights must not change inside it.
        Engines that cache prefixes on their own (vLLM's automatic prefix caching) need nothing here."""
        return nullcontext()
