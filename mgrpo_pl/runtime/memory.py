"""``ReleaseFreeMemory``: hand memory the step freed back to the OS, so a CPU run's resident size stays flat.

On Linux, glibc keeps memory freed by small and mid-sized tensors in its heaps for reuse. Each step of an RL loop
allocates in a different pattern (generation, then training), so those heaps fragment and the process's resident
size creeps up step after step although live tensors do not: about 1.5 GB over the demo's 10 steps before this
callback. ``malloc_trim(0)`` after every optimizer step returns the free pages; it costs milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


class ReleaseFreeMemory(Callback):
    """After every training step on a CPU, return freed heap memory to the operating system (glibc only)."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._trim is not None and pl_module.device.type == "cpu":
            self._trim(0)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._trim is not None and pl_module.device.type == "cpu":
            self._trim(0)
