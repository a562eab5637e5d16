"""``RolloutCallback``: owns the generation engine and keeps it on-policy.

It builds the engine at setup from the policy's weights, and after every optimizer step pushes the new weights
into it, so the next batch's rollouts (made by the DataModule in ``on_before_batch_transfer``) come from exactly the
weights that step produced. The DataModule finds it through the ``RolloutSource`` interface.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from mgrpo_pl.rollout.engine import GenerationEngine, build_engine, param_checksum
from mgrpo_pl.rollout.source import RolloutSource


def policy_weights(pl_module: LightningModule) -> Iterator[tuple[str, Tensor]]:
    """The policy's parameters under their HF names, one tensor at a time (never the whole model copied).

    FSDP2 shards are gathered per parameter with ``full_tensor()``.
    """
    for name, param in pl_module.policy.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor


class RolloutCallback(Callback, RolloutSource):
    """Builds the generation engine and refreshes its weights after every optimizer step.

    Args:
        engine: ``transformers`` (any device) or ``vllm``.
        share_weights: For the transformers engine: generate with the policy module itself (no copy, nothing
            to push). False keeps a separate copy refreshed every step, as an external engine is.
        engine_kwargs: Extra arguments of the engine (e.g. ``max_batch_size``, vLLM's ``gpu_memory_utilization``).
    """

    def __init__(
        self,
        engine: Literal["transformers", "vllm"] = "transformers",
        share_weights: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.kind = engine
        self.share_weights = share_weights
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine: GenerationEngine | None = None
        self.push_times: list[float] = []
        self.pushed_checksums: list[float] = []

    def engine(self) -> GenerationEngine:
        if self._engine is None:
            raise RuntimeError("RolloutCallback.engine() called before setup built the engine")
        return self._engine

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._engine is not None:
            return
        # configure_model may not have run yet at setup; the engine needs the weights.
        pl_module.configure_model()
        kwargs = dict(self.engine_kwargs)
        if self.kind == "transformers":
            kwargs.setdefault("share_weights", self.share_weights)
        self._engine = build_engine(self.kind, pl_module.policy, pl_module.tokenizer, **kwargs)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run restores the weights after setup: push them before the first rollout.
        self.push(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The module steps its optimizer inside training_step (manual optimization), so the weights are new here.
        self.push(pl_module)
        if self.push_times:
            pl_module.log("time/weight_push_s", self.push_times[-1], on_step=True, batch_size=1)

    @torch.no_grad()
    def push(self, pl_module: LightningModule) -> None:
        """Copy the policy's current weights into the engine (a no-op for a shared transformers engine)."""
        start = time.perf_counter()
        self.engine().update_weights(policy_weights(pl_module))
        self.push_times.append(time.perf_counter() - start)
        self.pushed_checksums.append(param_checksum(policy_weights(pl_module)))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._engine is not None and stage != "fit":
            self._engine.close()
