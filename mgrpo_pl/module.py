"""``MGRPOModule``: the policy, its frozen reference, and both layers' GRPO losses.

The training step receives a ``RolloutBatch`` (made by the DataModule from the live policy, after the previous
optimizer step) and minimises ``L_layer1 + layer2_weight * L_layer2`` (paper Eq. 3 and Eq. 6), each layer's loss
being the PPO-clipped surrogate with the k3 KL to the reference, aggregated by name (default: the paper's mean
over a completion's tokens, then mean over completions).

Departures from the paper, all documented options: ``old_logp`` is the trainer's own detached log-prob, since every
rollout batch gets exactly one optimizer step (so the ratio is 1 and clipping matters only with more steps per
batch); the engine's behaviour log-probs are compared with it, as a logged mismatch, and with ``tis_cap`` set they
re-weight each token's surrogate by the truncated importance ratio ``min(pi_trainer / pi_engine, tis_cap)``.

Optimisation is manual so that a step can run several micro-batches (packed by token budget) through backward
before the single optimizer step, without Lightning's gradient accumulation (which would also re-run the
DataModule's rollout hook per micro-batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mgrpo_pl.algo.losses import LossAggregation
from mgrpo_pl.distributed import (
    ROLLOUT_STAT_NAMES,
    Reduce,
    check_fsdp1_wrapping,
    fully_shard_models,
    global_normalisers,
    global_rollout_stats,
    global_sums,
    is_sharded,
    pad_micro_batches,
)
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.evaluation import TwoTurnEvaluation
from mgrpo_pl.layouts import AnyMicroBatch, completion_logprobs, micro_batch_layout, shared_prefix_allowed
from mgrpo_pl.method.loss import LossTerms, layer_counts, micro_batch_loss
from mgrpo_pl.metrics import SelfCorrectionMetrics
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from mgrpo_pl.modeling.swiglu import patch_swiglu_mlps
from mgrpo_pl.rollout.types import RolloutBatch
from mgrpo_pl.schedules import ScheduleName, warmup_schedule
from mgrpo_pl.step_stats import StepSums, step_values


def _default_optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)  # type: ignore[arg-type]


@contextlib.contextmanager
def _fsdp2_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _zero_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: ``nn.Dropout`` modules and the attention-dropout floats HF keeps."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class MGRPOModule(TwoTurnEvaluation):
    """Owns the policy and the frozen reference model and computes both MGRPO layers' losses.

    Args:
        model: A local folder, a hub id, or a built-in name (``tiny``, ``tiny-untied``, ``smollm2-135m-instruct``).
        dtype: Weights dtype: float32, bfloat16, float16 or auto.
        trust_remote_code: Allow model code from the checkpoint's repository (off unless you trust it).
        beta: Weight of the k3 KL to the reference (paper: 0.001). 0 skips loading the reference at all.
        reference_dtype: The frozen reference's weights dtype (float32, bfloat16, float16 or auto); None (default)
            uses ``dtype``. ``bfloat16`` halves its memory and, on a CPU with AMX, its forward time, as verl keeps its
            reference in bf16. Its log-probs then carry bf16 rounding (on the 30M benchmark model, 0.004 on average
            against fp32, a k3 floor of 1.5e-5 nats per token), which enters only the ``beta``-weighted KL term.
        clip_eps: PPO clip epsilon (lower side, and upper side unless ``clip_eps_high`` is set).
        clip_eps_high: Upper clip epsilon ("clip-higher", DAPO); None uses ``clip_eps``.
        layer2_weight: Weight of the layer-2 loss in the total.
        loss_aggregation: seq-mean-token-mean (paper), token-mean (DAPO) or seq-mean-token-sum-norm (Dr. GRPO).
        norm_length: The constant normaliser of seq-mean-token-sum-norm (defaults to the longest completion).
        temperature: Sampling temperature of the rollouts; log-probs are computed at it. Linked from
            ``data.rollout.sampling.temperature`` by the CLI.
        micro_batch_tokens: Padded tokens per forward pass; bounds memory, not the batch.
        shared_prefix: Run each distinct prompt (layer 1) or correction query (layer 2) once per micro-batch and
            let the rows that continue it reuse its key/value cache: the same loss and gradient as one row per
            sequence, without recomputing the G (or H) copies of the prefix. Off by itself under gradient
            checkpointing and sharded strategies (FSDP, ZeRO-3), where no prompt repeats, and under half-precision
            autocast on a GPU (``shared_prefix_allowed``).
        prefix_tree: With ``shared_prefix``, pack each problem's layer-1 group with its layer-2 groups where the
            budget allows, and run a layer-2 group on top of the keys and values of the layer-1 row its query repeats
            (``layouts.prefix_tree``): the same loss and gradient, without recomputing ``q ⊕ o_i`` per kept query.
        max_grad_norm: Gradient-norm clip; None disables it.
        tis_cap: Truncated importance sampling: weight each token's surrogate by ``min(pi_trainer / pi_engine,
            tis_cap)``, correcting for the generation engine's numerics (vLLM) differing from the trainer's. None
            (default) leaves the loss unweighted; the mismatch is logged either way (``train/engine_logprob_gap``).
        mask_truncated: Drop completions cut at the length limit from the loss (DAPO's overlong filtering).
        gradient_checkpointing: Trade compute for memory in the policy's forward.
        memory_efficient_mlp: Give the policy's SwiGLU MLPs (Llama, Qwen2/3, Mistral) a backward that keeps two of
            the four intermediate-width tensors per token and recomputes the rest elementwise: the same gradient,
            about a third less activation memory, no extra matmul (``mgrpo_pl.modeling.swiglu``).
        disable_dropout: Zero every dropout in the policy, so training log-probs match the engine's (as TRL does).
        optimizer: Optimizer factory (YAML ``class_path``/``init_args``); AdamW lr 1e-6 by default.
        lr_schedule: constant, linear or cosine decay after warm-up (paper: cosine).
        warmup_ratio: Fraction of the run spent in linear warm-up (paper: 0.03).
        min_lr_ratio: Final learning rate as a fraction of the initial one.
        lr_scheduler: A custom scheduler factory; overrides ``lr_schedule`` when given.
        results_dir: Where evaluation writes per-problem JSONL; defaults to the logger's folder.
    """

    def __init__(
        self,
        model: str = "tiny",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        beta: float = 0.001,
        reference_dtype: str | None = None,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        layer2_weight: float = 1.0,
        loss_aggregation: str = "seq-mean-token-mean",
        norm_length: int | None = None,
        temperature: float = 1.0,
        micro_batch_tokens: int = 8192,
        shared_prefix: bool = True,
        prefix_tree: bool = True,
        max_grad_norm: float | None = 1.0,
        tis_cap: float | None = None,
        mask_truncated: bool = False,
        gradient_checkpointing: bool = False,
        memory_efficient_mlp: bool = True,
        disable_dropout: bool = True,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_schedule: ScheduleName = "cosine",
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        lr_scheduler: LRSchedulerCallable | None = None,
        results_dir: str | None = None,
    ) -> None:
        super().__init__()
        try:
            LossAggregation(loss_aggregation)
        except ValueError:
            names = ", ".join(m.value for m in LossAggregation)
            raise ConfigError(
                f"--model.loss_aggregation {loss_aggregation!r} is unknown; choose from {names}"
            ) from None
        if beta < 0:
            raise ConfigError(f"--model.beta must be >= 0, got {beta}")
        if reference_dtype is not None:
            try:
                resolve_dtype(reference_dtype)
            except ValueError as err:
                raise ConfigError(f"--model.reference_{err}") from None
        if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
            raise ConfigError("--model.clip_eps and --model.clip_eps_high must be > 0")
        if temperature <= 0:
            raise ConfigError(f"--model.temperature must be > 0 (log-probs are taken at it), got {temperature}")
        if tis_cap is not None and tis_cap < 1:
            raise ConfigError(f"--model.tis_cap must be >= 1 (or null to turn it off), got {tis_cap}")
        if micro_batch_tokens < 1:
            raise ConfigError(f"--model.micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        # results_dir is where this run writes, not a property of the model: kept out of the checkpoint, because
        # LightningCLI re-applies a checkpoint's hyper-parameters over the command line on `test --ckpt_path`.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "results_dir"])
        self.automatic_optimization = False
        self.model_path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=trust_remote_code)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.policy: nn.Module | None = None
        # The reference lives outside the module tree: not in the optimizer, not in checkpoints, never trained.
        self._reference: list[nn.Module] = []
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
            _zero_dropout(self.policy)
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        if hp.memory_efficient_mlp:
            patch_swiglu_mlps(self.policy)
        if hp.beta > 0:
            dtype = hp.reference_dtype or hp.dtype
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

    @property
    def loss_terms(self) -> LossTerms:
        """The loss settings as ``method.loss`` takes them (read from ``hparams`` at each step)."""
        hp = self.hparams
        return LossTerms(
            layer_weights={1: 1.0, 2: hp.layer2_weight},
            beta=hp.beta,
            clip_eps=hp.clip_eps,
            clip_eps_high=hp.clip_eps_high,
            aggregation=LossAggregation(hp.loss_aggregation),
            tis_cap=hp.tis_cap,
        )

    @property
    def reference(self) -> nn.Module | None:
        return self._reference[0] if self._reference else None

    def on_fit_start(self) -> None:
        if self.reference is not None and not is_sharded(self.reference):
            self.reference.to(self.device)
        # Stop before the first step, with the fix, where FSDP1 would fail in the first backward.
        check_fsdp1_wrapping(getattr(self.trainer.strategy, "model", None), self.policy)

    def configure_optimizers(self) -> dict[str, object]:
        assert self.policy is not None, "configure_model must run first"
        optimizer = self.optimizer_factory(self.policy.parameters())
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            hp = self.hparams
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
            total = int(total) if math.isfinite(total) else 1
            scheduler = warmup_schedule(optimizer, hp.lr_schedule, total, hp.warmup_ratio, hp.min_lr_ratio)
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
        hp = self.hparams
        self._check_batch(batch)
        reduce = self._reduce()
        # Dr. GRPO's normaliser must be one constant for the whole batch, not each micro-batch's width.
        norm_length = hp.norm_length or max(int(batch.completion_lengths.max()), 1)
        counts = layer_counts(batch, hp.mask_truncated)
        counts, norm_length = global_normalisers(counts, norm_length, reduce, self.device)
        grad_scale = float(self.trainer.world_size) if reduce is not None else 1.0
        shared = self._shared_prefix()
        plan, collate = micro_batch_layout(batch, hp.micro_batch_tokens, shared=shared, tree=hp.prefix_tree)
        micro = pad_micro_batches(plan, reduce, is_sharded(self.policy), self.device)
        step = StepSums()
        pad_id = int(self.tokenizer.pad_token_id)
        for i, rows in enumerate(micro):
            mb = collate(batch, rows if rows is not None else [0], pad_id, hp.mask_truncated)
            if rows is None:  # an empty pass: a row whose mask is all False adds nothing
                mb = dataclasses.replace(mb, mask=torch.zeros_like(mb.mask))
            ref_logp = None
            if self.reference is not None:
                # Before the policy's forward: the reference's transient activations are gone by the time the
                # policy's graph is built, so the two never add up in peak memory.
                with torch.no_grad():
                    ref_logp = self._completion_logprobs(self.reference, mb)
            logp = self._completion_logprobs(self.policy, mb)
            result = micro_batch_loss(logp, ref_logp, mb, self.loss_terms, counts, norm_length)
            if not torch.isfinite(result.loss):
                raise FloatingPointError(
                    f"non-finite loss {float(result.loss)} at global step {self.global_step} (micro-batch {i}); "
                    "the weights were not updated"
                )
            self._backward(result.loss * grad_scale, last=i == len(micro) - 1)
            step.add(result, logp, mb, counted=rows is not None, tis_cap=hp.tis_cap)
        return step.sums, len(micro)

    def _check_batch(self, batch: RolloutBatch) -> None:
        hp = self.hparams
        if hp.tis_cap is not None and batch.engine_logprobs is None:
            raise ConfigError("--model.tis_cap needs the engine's behaviour log-probs, but this rollout batch has none")
        if hp.beta > 0 and self.reference is None:
            raise ConfigError(
                f"--model.beta={hp.beta} > 0 needs the frozen reference model, but none is loaded (configure_model "
                "loads it only when beta > 0); set --model.beta=0 to train without the KL term"
            )

    def _shared_prefix(self) -> bool:
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        return shared_prefix_allowed(self.hparams, is_sharded(self.policy), self.device.type, precision)

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
            return _fsdp2_no_sync(self.policy)  # FSDP2: accumulate unsharded, reduce-scatter on the last backward
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
        if self.hparams.max_grad_norm is not None and params:
            torch.nn.utils.clip_grads_with_norm_(params, self.hparams.max_grad_norm, grad_norm)
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
        sums = global_sums(sums, reduce, self.device)
        if reduce is not None:
            slowest = reduce(torch.tensor([train_s, float(num_micro)], dtype=torch.float64, device=self.device), "max")
            train_s, num_micro = float(slowest[0]), int(slowest[1])
            stats = global_rollout_stats(batch, reduce, self.device, ROLLOUT_STAT_NAMES)
            stats.update({k: v for k, v in batch.stats.items() if k not in ROLLOUT_STAT_NAMES})  # this rank's own
        else:
            stats = dict(batch.stats)
        loss, values = step_values(
            sums, self.loss_terms.layer_weights, batch.engine_logprobs is not None, self.hparams.tis_cap is not None
        )
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
