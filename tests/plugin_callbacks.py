"""Plug-in callbacks for tests that drive `mgrpo` as a user would."""

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Sends this process ``signum`` when training step ``step`` (1-based) starts, as a scheduler would mid-step."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)
