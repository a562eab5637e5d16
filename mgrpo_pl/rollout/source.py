"""The interface through which the DataModule asks for a generation engine.

The DataModule (in ``mgrpo_pl.data``) must not import the ``callbacks`` package, yet the engine is owned by a
callback so that it can refresh the engine's weights after every optimizer step. The callback implements this
interface; the DataModule finds it among ``trainer.callbacks`` by ``isinstance``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from mgrpo_pl.rollout.engines.base import GenerationEngine


class RolloutSource(ABC):
    """Something that holds a generation engine kept in step with the policy."""

    @abstractmethod
    def engine(self) -> GenerationEngine:
        """The engine, its weights equal to the policy's after the last optimizer step."""
