"""``CompletionsLogger``: sample problems, completions, corrections and rewards as TensorBoard text."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from mgrpo_pl.rollout.types import RolloutBatch


def _cell(value: object, limit: int = 600) -> str:
    text = str(value).replace("|", "\\|").replace("\n", "<br>")
    return text if len(text) <= limit else text[:limit] + "…"


def samples_markdown(samples: list[dict[str, object]]) -> str:
    """A Markdown table with one row per sample and one column per field."""
    if not samples:
        return ""
    columns = list(dict.fromkeys(k for s in samples for k in s))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(s.get(c, "")) for c in columns) + " |" for s in samples]
    return "\n".join(lines)


class CompletionsLogger(Callback):
    """Every ``every_n_steps`` training steps, write the rollout's sample rows to the logger as text.

    Args:
        every_n_steps: How often to log.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, RolloutBatch) or trainer.global_step % self.every_n_steps:
            return
        text = samples_markdown(batch.samples)
        experiment = getattr(trainer.logger, "experiment", None)
        if text and experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("completions", text, global_step=trainer.global_step)
