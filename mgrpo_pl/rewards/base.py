"""The reward interface every verifier in ``mgrpo_pl`` follows.

A reward is any callable with this call shape::

    reward(completions: list[str], answers: list[str]) -> torch.Tensor  # float32, shape [N], N == len(completions)

``completions[i]`` is the model's generated text (only the generated part, not the prompt) and ``answers[i]`` is the
gold answer of the problem it answers, as the dataset states it (for math: a GSM8K solution ending in ``#### 72``, a
MATH solution with ``\\boxed{...}``, or a plain answer string). Both lists have the same length; an implementation
raises ``ValueError`` when they do not and returns an empty tensor for empty lists.

The values are GRPO rewards and should lie in ``[0, 1]``; the rule-based verifiers return exactly 0.0 or 1.0, which
is what a yes/no use (layer-2 selection, accuracy metrics) expects. A reward must return in bounded time for any
input, however malformed: it runs inside every training step.

A plain function qualifies, so a custom reward needs no base class::

    def exact_match(completions: list[str], answers: list[str]) -> torch.Tensor:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        return torch.tensor([float(c.strip() == a.strip()) for c, a in zip(completions, answers)])

To name a reward in a YAML config (``data.reward: {class_path: my_pkg.MyReward, init_args: {...}}``) subclass
``Reward``: the CLI instantiates subclasses of it. From Python, any ``RewardFunction`` can be passed.

Self-correction reads turn 2 as the answer the model ends with: the correction's final answer when it states one,
else turn 1's. Which text states an answer is the reward's to say: ``Reward.final_answer`` (the value rules of
``mgrpo_pl/rewards/reading.py`` unless a subclass overrides it); a plain function is read with those rules.

``isinstance(obj, RewardFunction)`` only checks that ``obj`` is callable (``typing.Protocol`` cannot check
signatures at run time); the static type checker checks the full call shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mgrpo_pl.rewards.reading import FinalAnswer, read_final_answer

if TYPE_CHECKING:
    # Only for annotations: reward workers import this package and must not pay for a torch import.
    import torch


@runtime_checkable
class RewardFunction(Protocol):
    """Scores completions against gold answers: ``(completions, answers) -> float32 tensor [N]`` in ``[0, 1]``."""

    def __call__(self, completions: list[str], answers: list[str]) -> torch.Tensor:
        """Return one reward per completion.

        Args:
            completions: The N generated texts.
            answers: The N gold answers, ``answers[i]`` belonging to ``completions[i]``.

        Returns:
            A float32 tensor of shape ``[N]`` with values in ``[0, 1]``.

        Raises:
            ValueError: If the two lists differ in length.
        """
        ...


class RewardError(RuntimeError):
    """A reward that cannot score at all (its workers cannot start): training must stop, not go on with zeros."""


class Reward(ABC):
    """Base class for rewards configured by ``class_path`` in YAML; a ``RewardFunction`` with a class to name."""

    @abstractmethod
    def __call__(self, completions: list[str], answers: list[str]) -> torch.Tensor:
        """Return one reward per completion (see ``RewardFunction.__call__``)."""

    def final_answer(self, text: str) -> FinalAnswer | None:
        """The final answer ``text`` states, or None: a correction stating none keeps turn 1's answer.

        The default reads with the ``value`` rules; a reward that reads answers differently overrides it, so that
        what is rewarded and what counts as a stated answer agree.
        """
        return read_final_answer(text, "value")
