"""Lightning callbacks for MGRPO: the rollout engine owner, the completions logger, the metrics summary and the
preemption checkpoint."""

from callbacks.completions import CompletionsLogger
from callbacks.preemption import PreemptionCheckpoint
from callbacks.rollout import RolloutCallback
from callbacks.summary import MetricsSummary

__all__ = ["CompletionsLogger", "MetricsSummary", "PreemptionCheckpoint", "RolloutCallback"]
