"""``RolloutCallback``: owns the generation engine and keeps it on-policy.

It builds the engine at setup from the policy's weights, and after every optimizer step pushes the new weights
into it, so the next batch's rollouts (made by the DataModule in ``on_before_batch_transfer``) come from exactly the
weights that step produced. The DataModule finds it through the ``RolloutSource`` interface.

With an engine that supports it (vLLM on GPU with sleep mode), the engine sleeps while the trainer steps: rollouts
for a batch are made before ``on_train_batch_start``, and the push after the optimizer step wakes it again.

Gathering the weights for the push (``policy_weights``) follows the strategy the policy is trained under, one
parameter (or one FSDP unit) at a time so that the full model never exists twice:

* single device and DDP: the parameters themselves (Lightning wraps the LightningModule, not ``policy``);
* FSDP2 (``ModelParallelStrategy``): each DTensor parameter is gathered with ``full_tensor()``;
* FSDP1 (``FSDPStrategy``): each FSDP unit's own parameters under ``summon_full_params(unit, recurse=False)``,
  cloned before the unit is re-sharded (FSDP frees the unsharded storage on exit);
* DeepSpeed ZeRO-3: each parameter under ``deepspeed.zero.GatheredParameters``, cloned for the same reason.

The FSDP1 and ZeRO-3 paths need several GPUs and are untested here (CI is CPU-only); the single-device path is
what the tests and the CPU demo exercise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from mgrpo_pl.modeling.lora import merged_weights
from mgrpo_pl.rollout.engines import GenerationEngine, build_engine, param_checksum
from mgrpo_pl.rollout.source import RolloutSource

# Prefixes FSDP1 and activation checkpointing insert into parameter names; HF names never contain them.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# Lightning's mixed-precision settings: forwards run under autocast with this dtype over fp32 weights.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _fsdp1_root(pl_module: LightningModule) -> nn.Module | None:
    """The FSDP1 root that wraps the LightningModule, when the trainer runs ``FSDPStrategy``."""
    trainer = pl_module._trainer
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None) if trainer is not None else None
    if wrapped is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else None


def _fsdp1_weights(root: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Per FSDP unit: gather only that unit's parameters, clone them, re-shard. Untested on CPU (needs GPUs)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for unit_name, unit in root.named_modules():
        if not isinstance(unit, FSDP):
            continue
        nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDP) for p in m.parameters()}
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for name, param in unit.named_parameters():
                if id(param) in nested:
                    continue  # gathered when its own unit is visited
                full = _clean_name(f"{unit_name}.{name}" if unit_name else name)
                if full.startswith("policy."):
                    yield full.removeprefix("policy."), param.detach().clone()


def _zero3_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """DeepSpeed ZeRO-3: one parameter gathered at a time. Untested on CPU (needs DeepSpeed and GPUs)."""
    import deepspeed

    for name, param in policy.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield _clean_name(name), param.detach().clone()


def policy_weights(pl_module: LightningModule) -> Iterator[tuple[str, Tensor]]:
    """The policy's parameters under their HF names, one tensor at a time (never the whole model copied).

    See the module docstring for the per-strategy gathering.
    """
    policy = pl_module.policy
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        policy = policy.module
    if getattr(pl_module, "peft_model", None) is not None:
        # LoRA: the base model's weights with the adapters folded in, under the base model's names.
        yield from merged_weights(policy)
        return
    root = _fsdp1_root(pl_module)
    if root is not None:
        yield from _fsdp1_weights(root)
        return
    if any(hasattr(p, "ds_id") for p in policy.parameters()):
        yield from _zero3_weights(policy)
        return
    for name, param in policy.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()  # FSDP2 DTensor: this parameter only
        yield _clean_name(name), tensor


def _shards_policy(trainer: Trainer) -> bool:
    """Whether the trainer's strategy shards the policy's parameters across ranks (by class name: DeepSpeed's
    strategy class is importable only with deepspeed installed)."""
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    return bool(names & {"ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy"})


class RolloutCallback(Callback, RolloutSource):
    """Builds the generation engine and refreshes its weights after every optimizer step.

    Args:
        engine: ``transformers`` (any device), ``vllm``, or ``auto`` (vLLM when it is installed and has a device,
            else transformers).
        share_weights: For the transformers engine: generate with the policy module itself (no copy, nothing
            to push). False keeps a separate copy refreshed every step, as an external engine is. None (default):
            share on a single device and under DDP, keep a copy when the strategy shards the policy (FSDP,
            FSDP2, DeepSpeed), where generating with the sharded module itself runs every forward as a collective
            in lockstep and, under FSDP2, was measured to drift from the single-process run (docs/strategies.md).
            A ``dtype`` in ``engine_kwargs`` that differs from the policy's also means a copy.
        engine_kwargs: Extra arguments of the engine (e.g. ``dtype: bfloat16`` to sample in bf16 from an fp32
            policy, ``max_batch_size``, vLLM's ``gpu_memory_utilization``, ``cpu_kv_cache_gib``, ``sleep_mode``).
            With ``auto``, options the chosen engine lacks are ignored.
    """

    def __init__(
        self,
        engine: Literal["transformers", "vllm", "auto"] = "transformers",
        share_weights: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.kind = engine
        self.share_weights = share_weights
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engine: GenerationEngine | None = None
        self._closed = False
        self.push_times: list[float] = []
        self.pushed_checksums: list[float] = []

    def engine(self) -> GenerationEngine:
        if self._engine is None:
            raise RuntimeError("RolloutCallback.engine() called before setup built the engine")
        return self._engine

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._engine is not None and not self._closed:
            return
        # configure_model may not have run yet at setup; the engine needs the weights. Load them unsharded: a
        # separate engine copy (share_weights=False) must be a whole model, whatever the strategy shards later.
        load = getattr(pl_module, "load_models", None)
        (load if callable(load) else pl_module.configure_model)()
        kwargs = dict(self.engine_kwargs)
        if self.kind in ("transformers", "auto"):
            share = self.share_weights
            if share is None and _shards_policy(trainer):
                share = False
            # Still None: the engine decides from its dtype (another precision than the policy's means a copy).
            kwargs.setdefault("share_weights", share)
        self._engine = build_engine(self.kind, pl_module.policy, pl_module.tokenizer, **kwargs)
        self._closed = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._place(trainer, pl_module)
        # A resumed run restores the weights after setup: push them before the first rollout.
        self.push(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._place(trainer, pl_module)
        self._push_if_stale(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._place(trainer, pl_module)
        self._push_if_stale(pl_module)

    def _place(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The engine is built at setup, before the strategy moves the module to its device.
        self.engine().place(pl_module.device, AUTOCAST_DTYPES.get(str(trainer.precision)))

    def _push_if_stale(self, pl_module: LightningModule) -> None:
        # `mgrpo validate|test --ckpt_path` (and a resumed fit's sanity check) restore the checkpoint after setup
        # built the engine from the initial weights: push unless the engine already holds the policy's weights
        # (validation during fit, right after a step's push).
        if not self.pushed_checksums or self.pushed_checksums[-1] != param_checksum(policy_weights(pl_module)):
            self.push(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The batch's rollouts are made; until the push after the optimizer step the engine is idle.
        sleep = getattr(self._engine, "sleep", None)
        if callable(sleep):
            sleep()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The module steps its optimizer inside training_step (manual optimization), so the weights are new here.
        self.push(pl_module)
        if self.push_times:
            # The slowest rank's, like every logged wall time.
            pl_module.log(
                "time/weight_push_s", self.push_times[-1], on_step=True, batch_size=1, sync_dist=True, reduce_fx="max"
            )

    @torch.no_grad()
    def push(self, pl_module: LightningModule) -> None:
        """Copy the policy's current weights into the engine (a no-op for a shared transformers engine)."""
        start = time.perf_counter()
        self.engine().update_weights(policy_weights(pl_module))
        self.push_times.append(time.perf_counter() - start)
        self.pushed_checksums.append(param_checksum(policy_weights(pl_module)))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Every stage releases its engine (a later stage builds a new one): vLLM keeps process-wide state, and an
        # engine left alive after its fit would break the next engine built in the same process (a script that
        # trains and then evaluates, or several runs in one session) and keep its KV cache in memory. The object
        # stays readable (``engine()``) for inspection after the run.
        if self._engine is not None and not self._closed:
            self._engine.close()
            self._closed = True
