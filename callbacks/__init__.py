"""Lightning callbacks for MGRPO: the rollout engine owner and the completions logger."""

from callbacks.completions import CompletionsLogger
from callbacks.rollout import RolloutCallback
from callbacks.summary import MetricsSummary

__all__ = ["CompletionsLogger", "MetricsSummary", "RolloutCallback"]
