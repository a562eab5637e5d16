"""The two-turn evaluation half of ``MGRPOModule``: per-set self-correction metrics and per-problem JSONL.

Validation and test batches are ``EvalBatch`` objects whose turn-1 and turn-2 correctness the DataModule has already
scored (``MGRPORollout.evaluate``); this mixin only accumulates them per named set, logs
``{stage}/{set}/{acc_t1, acc_t2, delta, delta_i2c, delta_c2i, rate_i2c, rate_c2i}`` and writes every record as
``{stage}_{set}_step{N}.jsonl`` (one file per rank under data parallelism) into ``results_dir`` or the log folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lightning.pytorch import LightningModule
from torch import nn

from mgrpo_pl.metrics import SelfCorrectionMetrics, pair_values, turn_pairs
from mgrpo_pl.rollout.types import EvalBatch


class TwoTurnEvaluation(LightningModule):
    """Mixin for a LightningModule evaluated with the two-turn protocol; call ``_init_evaluation`` in ``__init__``."""

    results_dir: str | None

    def _init_evaluation(self, results_dir: str | None) -> None:
        self.results_dir = results_dir
        self.eval_metrics = nn.ModuleDict()
        self._eval_records: dict[str, list[dict[str, object]]] = defaultdict(list)
        self._eval_turns: dict[str, int] = {}  # turns per evaluated set, from its batches

    def _eval_name(self, stage: str, dataloader_idx: int) -> str:
        names = getattr(self.trainer.datamodule, f"{stage}_names", None) if self._trainer is not None else None
        return names[dataloader_idx] if names and dataloader_idx < len(names) else f"set{dataloader_idx}"

    def _eval_step(self, stage: str, batch: EvalBatch, dataloader_idx: int) -> None:
        if not isinstance(batch, EvalBatch):
            raise TypeError(f"{stage}_step expects an EvalBatch from MGRPODataModule, got {type(batch).__name__}")
        name = self._eval_name(stage, dataloader_idx)
        key = f"{stage}_{name}"
        correct = batch.correct
        self._eval_turns[key] = len(correct)
        for first, second in turn_pairs(len(correct)):
            pair = _pair_key(key, first, second)
            if pair not in self.eval_metrics:
                self.eval_metrics[pair] = SelfCorrectionMetrics().to(self.device)
            self.eval_metrics[pair].update(correct[first - 1], correct[second - 1])
        self._eval_records[key].extend(batch.records)

    def _eval_epoch_end(self, stage: str) -> None:
        for key, turns in [(k, t) for k, t in self._eval_turns.items() if k.startswith(f"{stage}_")]:
            name = key[len(stage) + 1 :]
            values: dict[str, object] = {}
            for first, second in turn_pairs(turns):
                metric = self.eval_metrics[_pair_key(key, first, second)]
                values.update(pair_values(first, second, metric.compute()))
                metric.reset()
            self.log_dict({f"{stage}/{name}/{k}": v for k, v in values.items()}, sync_dist=False)
            self._write_records(key, name, stage)

    def _write_records(self, key: str, name: str, stage: str) -> None:
        records = self._eval_records.pop(key, [])
        if not records or self.trainer.sanity_checking:
            return
        folder = Path(self.results_dir or (self.trainer.log_dir or "."))
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f"_rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        path = folder / f"{stage}_{name}_step{self.global_step}{suffix}.jsonl"
        with path.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    def validation_step(self, batch: EvalBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: EvalBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


def _pair_key(key: str, first: int, second: int) -> str:
    """The metric of a set's turns (first, second): turns (1, 2) under the set's own key, later pairs beside it."""
    return key if (first, second) == (1, 2) else f"{key}__t{first}_t{second}"
