"""Lightning callbacks for MGRPO: the rollout engine owner, the completions logger, the metrics summary, the
preemption checkpoint, the progress display and the memory release."""

from callbacks.completions import CompletionsLogger
from callbacks.memory import ReleaseFreeMemory
from callbacks.preemption import PreemptionCheckpoint
from callbacks.progress import MGRPOProgress
from callbacks.rollout import RolloutCallback
from callbacks.summary import MetricsSummary

__all__ = [
    "CompletionsLogger",
    "MGRPOProgress",
    "MetricsSummary",
    "PreemptionCheckpoint",
    "ReleaseFreeMemory",
    "RolloutCallback",
]
