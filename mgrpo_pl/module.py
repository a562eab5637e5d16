"""``MGRPOModule``: the policy, its frozen reference, and the step that trains them on a rollout batch.

The training step receives a ``RolloutBatch`` (made by the DataModule from the live policy, after the previous
optimizer step) and minimises the layers' weighted sum of GRPO losses (``mgrpo_pl.method.loss``). Its settings come
in three groups (``mgrpo_pl.settings``): the loss, how a step is computed, and the learning-rate schedule.

``old_logp`` is the trainer's own detached log-prob, since every rollout batch gets exactly one optimizer step (so
the ratio is 1 and clipping matters only with more steps per batch); the engine's behaviour log-probs are compared
with it, as a logged mismatch, and with ``loss.tis_cap`` set they re-weight each token's surrogate.

Optimisation is manual so that a step can run several micro-batches (packed by token budget) through backward
before the single optimizer step, without Lightning's gradient accumulation (which would also re-run the
DataModule's rollout hook per micro-batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mgrpo_pl.distributed import (
    Reduce,
    check_fsdp1_wrapping,
    fsdp2_no_sync,
    fully_shard_models,
    global_normalisers,
    global_rollout_stats,
    global_sums,
    is_sharded,
    pad_micro_batches,
    rollout_stat_names,
)
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.evaluation import TwoTurnEvaluation
from mgrpo_pl.layouts import AnyMicroBatch, completion_logprobs, micro_batch_layout, shared_prefix_allowed
from mgrpo_pl.method.loss import LossTerms, layer_counts, loss_layers, micro_batch_loss
from mgrpo_pl.metrics import SelfCorrectionMetrics
from mgrpo_pl.metrics.step_stats import StepSums, step_values
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer, resolve_model_path, zero_dropout
from mgrpo_pl.modeling.lora import add_lora, drop_frozen, fill_frozen
from mgrpo_pl.modeling.swiglu import patch_swiglu_mlps
from mgrpo_pl.rollout.types import RolloutBatch
from mgrpo_pl.schedules import warmup_schedule
from mgrpo_pl.settings import EfficiencySettings, LoraSettings, LossSettings, OptimSettings, settings_of


def _default_optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)  # type: ignore[arg-type]


class MGRPOModule(TwoTurnEvaluation):
    """Owns the policy and the frozen reference model and computes both MGRPO layers' losses.

    Args:
        model: A local folder, a hub id, or a built-in name (``tiny``, ``tiny-untied``, ``smollm2-135m-instruct``).
        dtype: Weights dtype: float32, bfloat16, float16 or auto.
        trust_remote_code: Allow model code from the checkpoint's repository (off unless you trust it).
        temperature: Sampling temperature of the rollouts; log-probs are computed at it. Linked from
            ``data.rollout.sampling.temperature`` by the CLI.
        disable_dropout: Zero every dropout in the policy, so training log-probs match the engine's (as TRL does).
        loss: The loss (``mgrpo_pl.settings.LossSettings``).
        efficiency: How a step is computed: micro-batches, layouts, memory (``EfficiencySettings``).
        optim: Learning-rate schedule and gradient clipping (``OptimSettings``).
        lora: LoRA adapters in place of full fine-tuning (``LoraSettings``; off unless ``r`` > 0).
        optimizer: Optimizer factory (YAML ``class_path``/``init_args``); AdamW lr 1e-6 by default.
        lr_scheduler: A custom scheduler factory; overrides ``optim.lr_schedule`` when given.
        results_dir: Where evaluation writes per-problem JSONL; defaults to the logger's folder.
    """

    def __init__(
        self,
        model: str = "tiny",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        temperature: float = 1.0,
        disable_dropout: bool = True,
        loss: LossSettings = LossSettings(),  # noqa: B008 - copied below; jsonargparse reads the defaults from it
        efficiency: EfficiencySettings = EfficiencySettings(),  # noqa: B008
        optim: OptimSettings = OptimSettings(),  # noqa: B008
        lora: LoraSettings = LoraSettings(),  # noqa: B008
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        results_dir: str | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"--model.temperature must be > 0 (log-probs are taken at it), got {temperature}")
        # Private copies: tests and notebooks change a module's settings in place, never a shared default.
        self.loss_settings = settings_of(LossSettings, loss)
        self.efficiency = settings_of(EfficiencySettings, efficiency)
        self.optim = settings_of(OptimSettings, optim)
        self.lora = settings_of(LoraSettings, lora)
        # Plain values only (the groups as dicts), so that a checkpoint loads with torch.load(weights_only=True).
        # results_dir is where this run writes, not a property of the model: kept out of the checkpoint.
        hparams = {"model": model, "dtype": dtype, "trust_remote_code": trust_remote_code}
        hparams |= {"temperature": temperature, "disable_dropout": disable_dropout}
        hparams |= {"loss": asdict(self.loss_settings), "efficiency": asdict(self.efficiency)}
        self.save_hyperparameters(hparams | {"optim": asdict(self.optim), "lora": asdict(self.lora)})
        self.automatic_optimization = False
        self.model_path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=trust_remote_code)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.policy: nn.Module | None = None
        # The reference lives outside the module tree: not in the optimizer, not in checkpoints, never trained.
        self._reference: list[nn.Module] = []
        # Under LoRA: peft's wrapper of the policy (outside the module tree too), for disable_adapter and export.
        self._peft: list[nn.Module] = []
        self.train_transitions = SelfCorrectionMetrics()
        self._init_evaluation(results_dir)

    # -- models -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Loading here, before Lightning's configure_model (which DeepSpeed ZeRO-3 runs inside zero.Init and FSDP1
        # inside its wrapping context), gives whole, ordinary modules that the strategy then shards as it sets up.
        self.load_models()

    def configure_model(self) -> None:
        """Load the models (if not yet loaded) and, under ``ModelParallelStrategy``, shard them with FSDP2."""
        self.load_models()
        self._fully_shard()

    def load_models(self) -> None:
        """Load the policy and (when ``beta > 0``) the frozen reference; a no-op once loaded."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = load_causal_lm(self.model_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        # from_pretrained returns eval mode; the policy trains in train mode (dropout, if kept, then applies).
        self.policy.train()
        if hp.disable_dropout:
            zero_dropout(self.policy)  # before LoRA: the adapters' own dropout is --model.lora.dropout
        if self.lora.enabled:
            # In place: self.policy stays the Hugging Face model, now with adapters, and only they require grad.
            self._peft = [add_lora(self.policy, self.lora)]
        if self.efficiency.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            if self.lora.enabled:  # reentrant checkpointing (older transformers) needs inputs that carry grad
                self.policy.enable_input_require_grads()
        if self.efficiency.memory_efficient_mlp:
            patch_swiglu_mlps(self.policy)  # leaves MLPs whose projections carry adapters as they are
        if self.loss_settings.beta > 0 and not self.lora.enabled:  # LoRA's reference: the base, adapters off
            dtype = self.efficiency.reference_dtype or hp.dtype
            reference = load_causal_lm(self.model_path, dtype=dtype, trust_remote_code=hp.trust_remote_code)
            self._reference = [reference.eval().requires_grad_(False)]

    def _fully_shard(self) -> None:
        """FSDP2 over the data-parallel mesh of ``ModelParallelStrategy``: each decoder layer, then the whole model.

        The reference is sharded the same way (it is frozen; its forwards all-gather like the policy's). Under the
        other strategies the reference stays whole on every rank: outside the module tree, DDP, FSDP1 and DeepSpeed
        never see it, so it is neither trained, checkpointed nor wrapped.
        """
        if self._device_mesh is not None and self.policy is not None and not is_sharded(self.policy):
            fully_shard_models([self.policy, *self._reference], self._device_mesh)

    def loss_terms(self, num_layers: int = 2) -> LossTerms:
        """The loss settings as ``method.loss`` takes them, for a rollout of ``num_layers`` layers (read each step)."""
        loss = self.loss_settings
        deepest = max(loss.layer_weights, default=2)
        if deepest > max(2, num_layers):
            raise ConfigError(
                f"--model.loss.layer_weights sets a weight for layer {deepest}, but the rollout has {num_layers} "
                "layer(s) (--data.rollout.num_layers)"
            )
        return LossTerms(
            layer_weights=loss.weights(loss_layers(num_layers)),
            beta=loss.beta,
            clip_eps=loss.clip_eps,
            clip_eps_high=loss.clip_eps_high,
            aggregation=loss.aggregation,
            tis_cap=loss.tis_cap,
        )

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference; None without the KL term and under LoRA (the policy, adapters off, serves)."""
        return self._reference[0] if self._reference else None

    @property
    def peft_model(self) -> nn.Module | None:
        """peft's wrapper of the policy under LoRA (``save_pretrained``, ``merge_and_unload``), else None."""
        return self._peft[0] if self._peft else None

    def _reference_logprobs(self, mb: AnyMicroBatch) -> Tensor | None:
        """The reference's log-probs of the micro-batch's completions, without gradient; None without the KL."""
        if self.loss_settings.beta == 0:
            return None
        with torch.no_grad():
            if self.peft_model is not None:
                with self.peft_model.disable_adapter():
                    return self._completion_logprobs(self.policy, mb)
            return self._completion_logprobs(self.reference, mb) if self.reference is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft_model is not None:  # LoRA: the adapters only; the frozen base is the model's own files
            checkpoint["state_dict"] = drop_frozen(checkpoint["state_dict"], self.policy, "policy.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft_model is not None:  # completed by the loaded base: the strict load still checks the adapters
            fill_frozen(checkpoint["state_dict"], self.policy, "policy.")

    def on_fit_start(self) -> None:
        if self.reference is not None and not is_sharded(self.reference):
            self.reference.to(self.device)
        # Stop before the first step, with the fix, where FSDP1 would fail in the first backward.
        check_fsdp1_wrapping(getattr(self.trainer.strategy, "model", None), self.policy)

    def configure_optimizers(self) -> dict[str, object]:
        assert self.policy is not None, "configure_model must run first"
        # Only what trains (the adapters under LoRA): frozen weights get no optimizer state.
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            opt = self.optim
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
            total = int(total) if math.isfinite(total) else 1
            scheduler = warmup_schedule(optimizer, opt.lr_schedule, total, opt.warmup_ratio, opt.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- log-probs -----------------------------------------------------------------------------------------------
    def _completion_logprobs(self, model: nn.Module, mb: AnyMicroBatch) -> Tensor:
        """[R, K] log-probs of the micro-batch's completion tokens (logits only where a completion token is
        predicted), aligned with ``mb.targets``."""
        return completion_logprobs(model, mb, temperature=self.hparams.temperature)

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> Tensor:
        if not isinstance(batch, RolloutBatch):
            raise TypeError(f"training_step expects a RolloutBatch from MGRPODataModule, got {type(batch).__name__}")
        tick = time.perf_counter()
        optimizer = self.optimizers()
        # Zeroed, not freed: gradient buffers re-allocated at every backward, amid the activations being freed,
        # fragment the CPU heap (measured: ~0.1 GiB more peak RSS on the 30M benchmark model).
        optimizer.zero_grad(set_to_none=False)
        sums, num_micro = self.backward_batch(batch)
        grad_norm = self._step_optimizer(optimizer)
        loss = self._log_training(batch, sums, grad_norm, num_micro, time.perf_counter() - tick)
        return torch.tensor(loss)

    def _reduce(self) -> Reduce | None:
        """Cross-rank reduction through the strategy, or None in a single process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        strategy = self.trainer.strategy
        return lambda tensor, op: strategy.reduce(tensor, reduce_op=op)

    def backward_batch(self, batch: RolloutBatch) -> tuple[dict[str, float], int]:
        """Accumulate the gradient of ``Σ_k w_k · L_k`` (``method.loss``) over token-budget micro-batches.

        Plan the micro-batches (``layouts``), then per micro-batch: log-probs of the reference and the policy, the
        loss, backward. Every micro-batch divides by the whole batch's per-layer counts, so the accumulated gradient
        equals the full-batch gradient whatever the budget. Under data parallelism "the whole batch" is the global
        batch of all ranks, and each rank's loss is scaled by the number of ranks to undo the strategy's gradient
        averaging (``mgrpo_pl.distributed``). Returns this rank's summed statistics and its number of micro-batches.
        """
        loss, eff = self.loss_settings, self.efficiency
        self._check_batch(batch)
        reduce = self._reduce()
        # Dr. GRPO's normaliser must be one constant for the whole batch, not each micro-batch's width.
        norm_length = loss.norm_length or max(int(batch.completion_lengths.max()), 1)
        counts = layer_counts(batch, loss.mask_truncated)
        counts, norm_length = global_normalisers(counts, norm_length, reduce, self.device)
        grad_scale = float(self.trainer.world_size) if reduce is not None else 1.0
        shared = self._shared_prefix()
        plan, collate = micro_batch_layout(batch, eff.micro_batch_tokens, shared=shared, tree=eff.prefix_tree)
        micro = pad_micro_batches(plan, reduce, is_sharded(self.policy), self.device)
        step, terms = StepSums(), self.loss_terms(batch.num_layers)
        pad_id = int(self.tokenizer.pad_token_id)
        for i, rows in enumerate(micro):
            mb = collate(batch, rows if rows is not None else [0], pad_id, loss.mask_truncated)
            if rows is None:  # an empty pass: a row whose mask is all False adds nothing
                mb = dataclasses.replace(mb, mask=torch.zeros_like(mb.mask))
            # Before the policy's forward: the reference's transient activations are gone by the time the policy's
            # graph is built, so the two never add up in peak memory.
            ref_logp = self._reference_logprobs(mb)
            logp = self._completion_logprobs(self.policy, mb)
            result = micro_batch_loss(logp, ref_logp, mb, terms, counts, norm_length)
            if not torch.isfinite(result.loss):
                raise FloatingPointError(
                    f"non-finite loss {float(result.loss)} at global step {self.global_step} (micro-batch {i}); "
                    "the weights were not updated"
                )
            self._backward(result.loss * grad_scale, last=i == len(micro) - 1)
            step.add(result, logp, mb, counted=rows is not None, tis_cap=loss.tis_cap)
        return step.sums, len(micro)

    def _check_batch(self, batch: RolloutBatch) -> None:
        loss = self.loss_settings
        if loss.tis_cap is not None and batch.engine_logprobs is None:
            raise ConfigError(
                "--model.loss.tis_cap needs the engine's behaviour log-probs, but this rollout batch has none"
            )
        if loss.beta > 0 and self.reference is None and self.peft_model is None:
            raise ConfigError(
                f"--model.loss.beta={loss.beta} > 0 needs the frozen reference model, but none is loaded "
                "(configure_model loads it only when beta > 0); set --model.loss.beta=0 to train without the KL term"
            )

    def _shared_prefix(self) -> bool:
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        return shared_prefix_allowed(self.efficiency, is_sharded(self.policy), self.device.type, precision)

    def _backward(self, loss: Tensor, last: bool) -> None:
        if self._trainer is None:  # used outside a Trainer (tests, notebooks)
            loss.backward()
            return
        # Under DDP only the last micro-batch's backward all-reduces, so ranks with different micro-batch counts
        # still meet in exactly one collective.
        with contextlib.nullcontext() if last else self._no_backward_sync():
            self.manual_backward(loss)

    def _no_backward_sync(self) -> contextlib.AbstractContextManager:
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        if block is not None:
            return block()
        if hasattr(self.policy, "set_requires_gradient_sync"):
            return fsdp2_no_sync(self.policy)  # FSDP2: accumulate unsharded, reduce-scatter on the last backward
        return contextlib.nullcontext()

    def _step_optimizer(self, optimizer: torch.optim.Optimizer) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        # FSDP2 gradients are sharded DTensors; their norm is one too, and full_tensor() is the global norm.
        norm_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(norm_value):
            raise FloatingPointError(
                f"non-finite gradient norm {norm_value} at global step {self.global_step}; the weights were not updated"
            )
        if self.optim.max_grad_norm is not None and params:
            torch.nn.utils.clip_grads_with_norm_(params, self.optim.max_grad_norm, grad_norm)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return norm_value

    def _log_training(
        self, batch: RolloutBatch, sums: dict[str, float], grad_norm: float, num_micro: int, train_s: float
    ) -> float:
        """Log the step's values over the global batch (every rank reduces; rank 0's logger writes). Returns the
        global loss."""
        reduce = self._reduce()
        sums = global_sums(sums, reduce, self.device, loss_layers(batch.num_layers))
        if reduce is not None:
            slowest = reduce(torch.tensor([train_s, float(num_micro)], dtype=torch.float64, device=self.device), "max")
            train_s, num_micro = float(slowest[0]), int(slowest[1])
            names = rollout_stat_names(batch.num_layers)
            stats = global_rollout_stats(batch, reduce, self.device, names)
            stats.update({k: v for k, v in batch.stats.items() if k not in names})  # this rank's own
        else:
            stats = dict(batch.stats)
        tis = self.loss_settings.tis_cap is not None
        weights = self.loss_settings.weights(loss_layers(batch.num_layers))
        loss, values = step_values(sums, weights, batch.engine_logprobs is not None, tis)
        values.update(
            {
                "train/grad_norm": grad_norm,
                "train/lr": self.optimizers().param_groups[0]["lr"],
                "train/micro_batches": float(num_micro),
                "time/train_s": train_s,
            }
        )
        values.update({f"rollout/{k}" if "/" not in k else k: v for k, v in stats.items()})
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch.num_problems)
        if batch.correct_t2.numel():
            # The running metric keeps this rank's counts (summed over ranks when computed); the step's values are
            # those of the global batch.
            self.train_transitions.update(batch.correct_t1, batch.correct_t2)
            step = self._global_transitions(batch, reduce)
            self.log_dict(
                {f"transitions/{k}": v for k, v in step.items()},
                on_step=True,
                on_epoch=False,
                batch_size=batch.num_problems,
            )
        else:  # no turn 2 (layer 2 off): turn 1's accuracy only
            right = torch.tensor([float(batch.correct_t1.sum()), float(batch.correct_t1.numel())], device=self.device)
            right = reduce(right, "sum") if reduce is not None else right
            acc = right[0] / right[1].clamp_min(1)
            self.log("transitions/acc_t1", acc, on_step=True, batch_size=batch.num_problems)
        return loss

    def _global_transitions(self, batch: RolloutBatch, reduce: Reduce | None) -> dict[str, Tensor]:
        """Acc@t1, Acc@t2, Δ, i→c, c→i of this step's (sample, probe) pairs of every rank."""
        metric = SelfCorrectionMetrics(sync_on_compute=False).to(self.device)
        metric.update(batch.correct_t1, batch.correct_t2)
        if reduce is not None:
            for name in ("total", "correct_t1", "correct_t2", "i2c", "c2i"):
                setattr(metric, name, reduce(getattr(metric, name).clone(), "sum"))
        return metric.compute()
