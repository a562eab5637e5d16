"""``PreemptionCheckpoint``: on SIGTERM (or SIGUSR1), stop after the current step with a checkpoint to resume from.

Cluster schedulers send SIGTERM (SLURM can be asked for SIGUSR1 with ``--signal``) some seconds before they kill a
job. Lightning already notes SIGTERM and stops the fit loop once the running step is done, but it writes nothing and
the process exits with status 0, as if the run had finished. This callback saves the state at that point as
Lightning's HPC checkpoint, ``<default_root_dir>/hpc_ckpt_<n>.ckpt``: ``--ckpt_path=hpc`` resumes from the newest,
and on SLURM a requeued job resumes from it with no flag at all. ``mgrpo`` then exits with status 143.

The step in flight is finished, not abandoned: its rollouts are on-policy for the weights it started from, and the
checkpoint then holds the optimizer, the data position and every random stream after it, so the resumed run's
steps equal the uninterrupted run's (``tests/e2e/test_preemption.py``).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class PreemptionCheckpoint(Callback):
    """Save a resumable checkpoint when the run is stopped by SIGTERM or SIGUSR1.

    Args:
        sigusr1: Treat SIGUSR1 like SIGTERM (unless Lightning's SLURM auto-requeue already handles it).
    """

    def __init__(self, sigusr1: bool = True) -> None:
        self.sigusr1 = sigusr1
        self.saved_path: str | None = None
        self._previous: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.saved_path = None
        # Not at on_fit_start: Lightning records the process's handlers after it and restores them at the end.
        if not self.sigusr1 or not hasattr(signal, "SIGUSR1"):
            return
        current = signal.getsignal(signal.SIGUSR1)
        if current not in (None, signal.SIG_DFL):
            return  # Lightning's SLURM auto-requeue handler, or the user's own
        self._previous = current

        def stop(signum: int, frame: FrameType | None) -> None:
            # The same flag Lightning's SIGTERM handler sets: the loops stop once the running step is done.
            trainer._signal_connector.received_sigterm = True

        signal.signal(signal.SIGUSR1, stop)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Saved here, where a ModelCheckpoint saves too: Lightning's own stop comes after the end-of-step bookkeeping,
        # and a checkpoint taken there after an epoch's last step resumes one batch into the wrong epoch.
        stop = trainer.received_sigterm
        if trainer.world_size > 1:  # saving is collective: every rank saves if any was signalled
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.saved_path is None:
            self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()  # Lightning calls no teardown hook after an exception
        # A signal that landed after the step's end (in a validation during fit): the state is the end of that step.
        stopped = isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING
        if stopped and self.saved_path is None:
            self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(
            f"stopped by a signal in step {trainer.global_step}: saved {path}; resume with `--ckpt_path=hpc` (the "
            "newest hpc_ckpt_*.ckpt in --trainer.default_root_dir)"
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
