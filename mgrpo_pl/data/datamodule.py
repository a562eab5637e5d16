"""``MGRPODataModule``: problem batches in, on-policy rollouts out.

The loaders yield plain lists of ``Problem``. Rollouts are made in ``on_before_batch_transfer``, which Lightning
calls once per batch in the main process *after* the previous batch's optimizer step: generating there is
on-policy, whereas generating inside the dataset iterator would be one step stale (the fit loop prefetches one
batch). In validation and test the same hook runs the two-turn evaluation instead.

The engine comes from a ``RolloutSource`` callback (``callbacks.RolloutCallback``) when the trainer has one, which
keeps it in step with the policy; without one the DataModule generates with the policy itself through a shared
transformers engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

from mgrpo_pl.data.context import fit_to_context
from mgrpo_pl.data.loaders import Problem, load_problems
from mgrpo_pl.data.resumable import ResumableLoader
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.rewards import MathReward
from mgrpo_pl.rewards.base import Reward, RewardFunction
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import GenerationEngine, TransformersEngine
from mgrpo_pl.rollout.source import RolloutSource
from mgrpo_pl.runtime.rng import RngState

log = logging.getLogger(__name__)


@dataclass
class ProblemSet:
    """One problem source, as named in YAML.

    Attributes:
        source: Loader name: jsonl, gsm8k, math, minerva, olympiadbench, arithmetic or hf.
        name: Name used in logged metric keys and result files (defaults to ``source``).
        options: Keyword arguments of the loader (``path``, field names, ``limit``, ``n`` ...).
    """

    source: str = "arithmetic"
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.source

    def load(self) -> list[Problem]:
        problems = load_problems(self.source, **self.options)
        if not problems:
            raise ConfigError(f"problem set {self.label!r} ({self.source}, {self.options}) yielded no problems")
        return problems


def _as_list(sets: ProblemSet | list[ProblemSet] | None) -> list[ProblemSet]:
    if sets is None:
        return []
    return list(sets) if isinstance(sets, list) else [sets]


class ProblemBatch:
    """The problems of one batch, as the data loaders yield them; the datamodule turns them into a rollout.

    Opaque on purpose: before a batch reaches ``on_before_batch_transfer``, Lightning's FSDP, DeepSpeed and
    true-half precision plugins walk it with ``apply_to_collection`` to cast its tensors, and that refuses a frozen
    dataclass such as ``Problem`` inside a list. A plain object is passed through untouched.
    """

    __slots__ = ("problems",)

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems


def _collate(problems: list[Problem]) -> ProblemBatch:
    return ProblemBatch(problems)


class MGRPODataModule(LightningDataModule):
    """Problems for training and evaluation, turned into rollouts on the fly.

    Args:
        train: The training problems.
        val: Problem sets evaluated during fit (two turns), one dataloader each.
        test: Problem sets for ``mgrpo test``, one dataloader each.
        batch_size: Problems per training step (B).
        eval_batch_size: Problems per evaluation batch.
        rollout: G, H, sampling, guide phrases and scoring of the rollouts.
        reward: Reward function (``reward(completions, answers) -> Tensor``); the math-verify reward by default.
            In YAML name a ``Reward`` subclass by ``class_path``; from Python any ``RewardFunction`` works.
        reward_timeout_s: Per-answer timeout of the default reward.
        reward_workers: Worker processes of the default reward.
        shuffle: Shuffle the training problems each epoch, in an order fixed by ``seed`` and the epoch.
        num_workers: DataLoader workers (loading problems is cheap; generation always runs in the main process).
        seed: Seed of the training order.

    Resuming (``--ckpt_path``) continues with the same problems and the same random streams: the train loader's
    position and the RNG states are checkpointed, and the RNG states are restored right before the first rollout.
    """

    def __init__(
        self,
        train: ProblemSet | None = None,
        val: ProblemSet | list[ProblemSet] | None = None,
        test: ProblemSet | list[ProblemSet] | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        rollout: RolloutConfig = RolloutConfig(),  # noqa: B008 - a dataclass so the CLI can link its fields
        reward: Reward | None = None,
        reward_timeout_s: float = 5.0,
        reward_workers: int = 2,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size < 1:
            raise ConfigError(f"--data.eval_batch_size must be >= 1, got {eval_batch_size}")
        self.train_set = train or ProblemSet()
        self.val_sets = _as_list(val)
        self.test_sets = _as_list(test)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.rollout_config = rollout
        self._reward = reward
        self.reward_timeout_s = reward_timeout_s
        self.reward_workers = reward_workers
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        self._train_loader: ResumableLoader | None = None
        self._pending_state: dict[str, Any] | None = None
        self.val_names = [s.label for s in self.val_sets]
        self.test_names = [s.label for s in self.test_sets]
        self._problems: dict[str, list[list[Problem]]] = {}
        self._fitted: set[str] = set()
        self._pipeline: MGRPORollout | None = None
        self._fallback_engine: GenerationEngine | None = None

    # -- problems ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and "train" not in self._problems:
            self._problems["train"] = [self.train_set.load()]
        if stage in ("fit", "validate") and "val" not in self._problems:
            self._problems["val"] = [s.load() for s in self.val_sets]
        if stage == "test" and "test" not in self._problems:
            self._problems["test"] = [s.load() for s in self.test_sets]
            if not self.test_sets:
                raise ConfigError("`mgrpo test` needs at least one problem set in --data.test")

    def _loader(self, problems: list[Problem], batch_size: int, shuffle: bool) -> DataLoader:
        # A private generator: creating the iterator draws a base seed, which must not come from the global RNG that
        # training samples from (a run that validates would otherwise train on other rollouts than one that does not).
        return DataLoader(
            problems,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=_collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _fit_to_context(self, split: str) -> list[list[Problem]]:
        """The split's problem sets, each checked against the engine's context once, when its loader is first built:
        after setup (the tokenizer and the engine exist), before any rollout."""
        if split not in self._fitted:
            sets = {"train": [self.train_set], "val": self.val_sets, "test": self.test_sets}[split]
            context, pipeline = self.engine().max_context, self.pipeline()
            # The deepest query (the last layer's, or the last turn's) with its completion must fit.
            budget, flag = pipeline.context_budget(training=split == "train")
            self._problems[split] = [
                fit_to_context(
                    problems,
                    [len(ids) for ids in pipeline.encode(problems)] if context is not None else [0] * len(problems),
                    budget,
                    context,
                    flag=flag,
                    on_error=problem_set.options.get("on_error", "raise"),
                    set_name=problem_set.label,
                )
                for problem_set, problems in zip(sets, self._problems.get(split, []))
            ]
            self._fitted.add(split)
        return self._problems.get(split, [])

    def train_dataloader(self) -> DataLoader:
        # Each data-parallel rank reads (and generates rollouts for) its own shard of every global batch;
        # batch_size is per rank, as everywhere in Lightning.
        shard = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None and self.trainer.world_size > 1:
            kwargs = self.trainer.strategy.distributed_sampler_kwargs or {}
            shard = {"num_replicas": int(kwargs.get("num_replicas", 1)), "rank": int(kwargs.get("rank", 0))}
        self._train_loader = ResumableLoader(
            self._fit_to_context("train")[0],
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            collate_fn=_collate,
            num_workers=self.num_workers,
            **shard,
        )
        return self._train_loader

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(p, self.eval_batch_size, False) for p in self._fit_to_context("val")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(p, self.eval_batch_size, False) for p in self._fit_to_context("test")]

    # -- rollouts ------------------------------------------------------------------------------------------------
    @property
    def reward(self) -> RewardFunction:
        if self._reward is None:
            self._reward = MathReward(timeout_s=self.reward_timeout_s, num_workers=self.reward_workers)
        return self._reward

    def pipeline(self) -> MGRPORollout:
        if self._pipeline is None:
            tokenizer = self.trainer.lightning_module.tokenizer
            self._pipeline = MGRPORollout(self.rollout_config, tokenizer, self.reward)
        return self._pipeline

    def engine(self) -> GenerationEngine:
        for callback in self.trainer.callbacks:
            if isinstance(callback, RolloutSource):
                return callback.engine()
        if self._fallback_engine is None:
            module = self.trainer.lightning_module
            log.info("no RolloutSource callback: generating with the policy through a shared transformers engine")
            self._fallback_engine = TransformersEngine(module.policy, module.tokenizer, share_weights=True)
        return self._fallback_engine

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, ProblemBatch):
            batch = batch.problems
        if self.trainer is None or not isinstance(batch, list):
            return batch
        stage = self.trainer.state.stage
        if stage == RunningStage.TRAINING:
            pipeline = self.pipeline()
            self._restore_pending(pipeline)
            if self._train_loader is not None:
                self._train_loader.mark_used()
            return pipeline.rollout(self.engine(), batch, step=self.trainer.global_step)
        if stage in (RunningStage.VALIDATING, RunningStage.TESTING, RunningStage.SANITY_CHECKING):
            return self.pipeline().evaluate(self.engine(), batch)
        return batch

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": RngState.capture()}
        if self._pipeline is not None:
            state["guide_rng"] = self._pipeline.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied before the first rollout, not now: loading the loader and running validation in between would
        # otherwise consume random numbers the uninterrupted run did not.
        self._pending_state = state_dict

    def _restore_pending(self, pipeline: MGRPORollout) -> None:
        if self._pending_state is None:
            return
        state, self._pending_state = self._pending_state, None
        if "rng" in state:
            RngState.restore(state["rng"])
        if "guide_rng" in state:
            pipeline.generator.set_state(state["guide_rng"])

    def teardown(self, stage: str) -> None:
        # Only the reward this module made is ours to close; a user's reward may be shared.
        if isinstance(self._reward, MathReward):
            self._reward.close()
