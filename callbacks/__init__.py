"""Lightning callbacks for MGRPO: the rollout engine owner, the completions logger, the metrics summary, the
preemption checkpoint, the progress display and the memory release."""

from callbacks.completions import CompletionsLogger
from callbacks.rollout import RolloutCallback
from callbacks.summary import MetricsSummary
from mgrpo_pl.runtime import MGRPOProgress, PreemptionCheckpoint, ReleaseFreeMemory

__all__ = [
    "CompletionsLogger",
    "MGRPOProgress",
    "MetricsSummary",
    "PreemptionCheckpoint",
    "ReleaseFreeMemory",
    "RolloutCallback",
]
