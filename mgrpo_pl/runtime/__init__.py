"""What every ``mgrpo`` run gets besides the method (``mgrpo_pl.cli.defaults`` adds them): a checkpoint on
preemption, flat CPU memory, readable progress and streamed checkpoint writes. Lightning callbacks and a plugin that
any Lightning project can use; the ``callbacks`` package re-exports the callbacks."""

from mgrpo_pl.runtime.checkpoint_io import StreamingCheckpointIO
from mgrpo_pl.runtime.memory import ReleaseFreeMemory
from mgrpo_pl.runtime.preemption import PreemptionCheckpoint
from mgrpo_pl.runtime.progress import MGRPOProgress

__all__ = ["MGRPOProgress", "PreemptionCheckpoint", "ReleaseFreeMemory", "StreamingCheckpointIO"]
