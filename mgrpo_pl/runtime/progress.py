"""``MGRPOProgress``: progress a user can read, in a terminal and in a log file.

In a terminal it is Lightning's progress bar showing running means (layer-1 reward, Acc@t1, Acc@t2, over all steps
so far, the numbers the end-of-run table prints) instead of last-step values, epoch counters and ``v_num``. When the
output is a file or a pipe a bar prints nothing until the end, so it prints one line per optimizer step instead:

    step 3/10 | 41.2 s | 97 gen tok/s | reward 0.375 | Acc@t1 0.333 Acc@t2 0.375 | kept 3 (running means)
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

if _RICH_AVAILABLE:
    from lightning.pytorch.callbacks import RichProgressBar as _Bar
else:  # pragma: no cover - rich is optional for Lightning
    _Bar = TQDMProgressBar  # type: ignore[assignment,misc]


def _value(trainer: Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


class RunningMeans:
    """The training run's running means: the layer-1 reward over steps, and Acc@t1 / Acc@t2 over every (sample,
    correction) pair so far, from the module's ``train_transitions`` counts (what the summary table reports)."""

    def __init__(self) -> None:
        self.reward_sum = 0.0
        self.steps = 0

    def add_step(self, trainer: Trainer) -> None:
        reward = _value(trainer, "reward/layer1")
        if reward is not None:
            self.reward_sum += reward
            self.steps += 1

    def values(self, pl_module: LightningModule) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.steps:
            out["reward"] = self.reward_sum / self.steps
        counts = getattr(pl_module, "train_transitions", None)
        total = int(getattr(counts, "total", 0)) if counts is not None else 0
        if total:
            out["Acc@t1"] = int(counts.correct_t1) / total
            out["Acc@t2"] = int(counts.correct_t2) / total
        return out


def step_line(trainer: Trainer, running: dict[str, float], seconds: float) -> str:
    """One optimizer step, as ``MGRPOProgress`` prints it when the output is not a terminal."""
    bound = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
    parts = [f"step {trainer.global_step}{bound}"]
    parts.append(f"{seconds:.1f} s")
    generated, generate_s = _value(trainer, "tokens/generated"), _value(trainer, "time/generate_s")
    if generated is not None and generate_s:
        parts.append(f"{generated / generate_s:.0f} gen tok/s")
    if "reward" in running:
        parts.append(f"reward {running['reward']:.3f}")
    if "Acc@t1" in running:
        parts.append(f"Acc@t1 {running['Acc@t1']:.3f} Acc@t2 {running['Acc@t2']:.3f}")
    kept = _value(trainer, "layer2/kept_queries")
    if kept is not None:
        parts.append(f"kept {kept:.0f}")
    return " | ".join(parts) + " (running means)"


class MGRPOProgress(_Bar):
    """A progress bar with running means in a terminal; one line per optimizer step when the output is not one.

    Args:
        lines: Print a line per step: ``None`` when stdout is not a terminal, ``True`` always, ``False`` never.
    """

    def __init__(self, lines: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lines = lines
        self.running = RunningMeans()
        self._tick = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.lines is None:
            self.lines = not sys.stdout.isatty()
        if self.lines:
            self.disable()  # a bar in a file shows only its last state, at the end
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.running = RunningMeans()
        self._tick = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.running.add_step(trainer)
        super().on_train_batch_end(trainer, pl_module, *args)
        if self.lines:
            now, start = time.perf_counter(), self._tick
            self._tick = now
            self._print(step_line(trainer, self.running.values(pl_module), now - start))

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_validation_batch_end(trainer, pl_module, *args, **kwargs)
        self._eval_line(trainer, "validation", *args, **kwargs)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_test_batch_end(trainer, pl_module, *args, **kwargs)
        self._eval_line(trainer, "test", *args, **kwargs)

    def _eval_line(self, trainer: Trainer, stage: str, *args: Any, **kwargs: Any) -> None:
        # args are Lightning's (outputs, batch, batch_idx[, dataloader_idx]).
        if not self.lines or trainer.sanity_checking:
            return
        batch_idx = args[2] if len(args) > 2 else kwargs.get("batch_idx", 0)
        loader = args[3] if len(args) > 3 else kwargs.get("dataloader_idx", 0)
        short = "val" if stage == "validation" else stage
        totals = getattr(trainer, f"num_{short}_batches", [])
        names = getattr(trainer.datamodule, f"{short}_names", None) or []
        name = names[loader] if loader < len(names) else str(loader)
        total = f"/{int(totals[loader])}" if loader < len(totals) else ""
        self._print(f"{stage} {name}: batch {batch_idx + 1}{total}")

    def _get_train_description(self, current_epoch: int) -> str:
        # Rich's "Epoch 0/-2" means nothing in a run bounded by max_steps.
        return "Training"

    @rank_zero_only
    def _print(self, line: str) -> None:
        print(line, flush=True)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        # Only the running means: no v_num, and no last-step values that disagree with the end-of-run table.
        return {k: f"{v:.3f}" for k, v in self.running.values(pl_module).items()}
