"""What every ``mgrpo`` run gets, whatever callbacks and plugins its config lists (a config's own instance of the same
kind wins):

- ``PreemptionCheckpoint``: SIGTERM/SIGUSR1 stop the run with a checkpoint to resume from, and exit status 143;
- ``ModelCheckpoint(save_last="link")``: Lightning's default checkpoint, plus ``last.ckpt`` linked to it, the stable
  path the README's evaluation and resume commands use (unless ``enable_checkpointing: false``);
- ``ReleaseFreeMemory``: a CPU run's resident memory stays flat from step to step;
- ``MGRPOProgress``: running means in a terminal, one line per step in a log file (unless
  ``enable_progress_bar: false``);
- ``StreamingCheckpointIO``: checkpoint files written without an in-memory copy, where the strategy writes one file
  (DeepSpeed and sharded FSDP write folders their own way).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import CheckpointIO

from mgrpo_pl.runtime import MGRPOProgress, PreemptionCheckpoint, ReleaseFreeMemory, StreamingCheckpointIO

SINGLE_FILE_STRATEGIES = ("auto", "ddp", "single_device")


def default_callbacks(trainer_config: dict[str, Any], listed: list[Callback]) -> list[Callback]:
    """The callbacks to add to ``listed`` (those the config gives) for a Trainer built from ``trainer_config``."""

    def missing(kind: type) -> bool:
        return not any(isinstance(c, kind) for c in listed)

    def enabled(flag: str) -> bool:
        return trainer_config.get(flag, True) is not False

    added: list[Callback] = []
    if missing(PreemptionCheckpoint):
        added.append(PreemptionCheckpoint())
    if enabled("enable_checkpointing") and missing(ModelCheckpoint):
        added.append(ModelCheckpoint(save_last="link"))
    if missing(ReleaseFreeMemory):
        added.append(ReleaseFreeMemory())
    if enabled("enable_progress_bar") and missing(ProgressBar):
        added.append(MGRPOProgress())
    return added


def default_plugins(trainer_config: dict[str, Any]) -> list[Any]:
    """The Trainer's plugins, with ``StreamingCheckpointIO`` added where it applies and none is given."""
    plugins = trainer_config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, list) else [plugins]
    strategy = trainer_config.get("strategy", "auto")
    if (
        isinstance(strategy, str)
        and strategy in SINGLE_FILE_STRATEGIES
        and not any(isinstance(p, CheckpointIO) for p in plugins)
    ):
        plugins.append(StreamingCheckpointIO())
    return plugins
