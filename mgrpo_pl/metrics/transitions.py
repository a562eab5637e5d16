"""Two-turn self-correction metrics (the paper's Table 2, following SCoRe), as torchmetrics classes.

Every problem is answered twice: turn 1 answers it, turn 2 is the ``q ⊕ o ⊕ p_guide`` continuation. From the two
per-problem correctness flags we report

* ``acc_t1`` / ``acc_t2``: Accuracy@t1 and Accuracy@t2;
* ``delta`` = Acc@t2 − Acc@t1;
* ``delta_i2c``: the fraction of ALL problems that were wrong at turn 1 and right at turn 2 (Δ^{i→c});
* ``delta_c2i``: the fraction of ALL problems that were right at turn 1 and wrong at turn 2 (Δ^{c→i});
* ``rate_i2c``: i→c among the problems wrong at turn 1 (how often a wrong answer gets fixed);
* ``rate_c2i``: c→i among the problems right at turn 1 (how often a right answer gets broken).

``delta`` is computed as ``delta_i2c - delta_c2i`` so that identity holds bit for bit; it equals
``acc_t2 - acc_t1`` up to one float rounding (the integer counts satisfy ``t2 - t1 == i2c - c2i`` exactly).
A metric with no problems reports 0.0 for every value, never NaN.

All states are integer counts reduced with ``sum``, so under DDP ``compute()`` gives the value over the problems
of every rank, not a mean of per-rank ratios.

Logging in a LightningModule:

* ``SelfCorrectionMetrics.compute()`` returns a dict: ``self.log_dict(metric.compute())`` at epoch end, then
  ``metric.reset()``.
* ``LightningModule.log`` accepts a Metric object only if its ``compute`` returns one scalar: use the one-value
  subclasses (``AccuracyAtT1`` … ``CorrectToIncorrectRate``), or ``self_correction_collection()`` which bundles
  all seven in a ``MetricCollection`` that ``self.log_dict`` accepts and that shares one set of states.
* Caveat (measured with torchmetrics 1.9): calling only ``update()`` and logging the metric object with
  ``on_step=True`` logs nothing, silently. For per-step values call the metric (``forward``), which returns the
  batch value and also accumulates; for the epoch value call ``update()`` and log with ``on_epoch=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

_STATE_NAMES = ("total", "correct_t1", "correct_t2", "i2c", "c2i")


def _as_flags(value: Tensor, name: str) -> Tensor:
    """Return ``value`` as a flat bool tensor, refusing anything that is not exactly 0/1.

    A float reward such as 0.7 must be thresholded by the caller: silently rounding it here would hide a reward
    that is not binary.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool:
        return value.reshape(-1)
    if value.is_complex():
        raise ValueError(f"{name} must be bool or 0/1, got a complex tensor")
    if value.numel() and not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 or bool values; threshold rewards before updating the metric")
    return value.reshape(-1).bool()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` as a float tensor, 0.0 when ``den`` is 0 (an empty metric must not log NaN).

    Every numerator here counts a subset of its denominator's problems, so ``den == 0`` implies ``num == 0`` and
    clamping the denominator to 1 gives 0.0 without a device-to-host sync.
    """
    dtype = torch.get_default_dtype()
    return num.to(dtype) / den.clamp_min(1).to(dtype)


class SelfCorrectionMetrics(Metric):
    """All two-turn self-correction values from one set of summed counts.

    ``update(correct_t1, correct_t2)`` takes two tensors of the same shape (normally ``[N]``, one entry per problem
    or per sample; any shape is flattened), bool or exactly 0/1. ``compute()`` returns a dict with the keys
    ``acc_t1, acc_t2, delta, delta_i2c, delta_c2i, rate_i2c, rate_c2i`` (see the module docstring).
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    # Every state is a sum, so forward may compute the batch value from the batch alone and add it to the total.
    full_state_update = False

    total: Tensor
    correct_t1: Tensor
    correct_t2: Tensor
    i2c: Tensor
    c2i: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in _STATE_NAMES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct_t1: Tensor, correct_t2: Tensor) -> None:
        """Add one batch of problems.

        Args:
            correct_t1: ``[N]`` whether each turn-1 answer was right (bool or 0/1).
            correct_t2: ``[N]`` whether each turn-2 answer was right (bool or 0/1).

        Raises:
            ValueError: if the shapes differ or a value is not 0/1.
        """
        if correct_t1.shape != correct_t2.shape:
            raise ValueError(
                f"correct_t1 and correct_t2 must have the same shape, got {tuple(correct_t1.shape)} "
                f"and {tuple(correct_t2.shape)}"
            )
        t1 = _as_flags(correct_t1, "correct_t1").to(self.total.device)
        t2 = _as_flags(correct_t2, "correct_t2").to(self.total.device)
        self.total += t1.numel()
        self.correct_t1 += t1.sum()
        self.correct_t2 += t2.sum()
        self.i2c += (~t1 & t2).sum()
        self.c2i += (t1 & ~t2).sum()

    def _values(self) -> dict[str, Tensor]:
        delta_i2c = _ratio(self.i2c, self.total)
        delta_c2i = _ratio(self.c2i, self.total)
        return {
            "acc_t1": _ratio(self.correct_t1, self.total),
            "acc_t2": _ratio(self.correct_t2, self.total),
            "delta": delta_i2c - delta_c2i,
            "delta_i2c": delta_i2c,
            "delta_c2i": delta_c2i,
            "rate_i2c": _ratio(self.i2c, self.total - self.correct_t1),
            "rate_c2i": _ratio(self.c2i, self.correct_t1),
        }

    def compute(self) -> dict[str, Tensor]:
        """Return every value as a 0-dim float tensor, keyed as in the class docstring."""
        return self._values()


class _OneValue(SelfCorrectionMetrics):
    """Shares the states and ``update`` of ``SelfCorrectionMetrics``; ``compute`` returns the scalar under ``key``."""

    key: str = ""

    def compute(self) -> Tensor:  # type: ignore[override]
        """Return this metric's single value as a 0-dim float tensor."""
        return self._values()[self.key]


class AccuracyAtT1(_OneValue):
    """Accuracy@t1: the fraction of problems answered right at turn 1."""

    key = "acc_t1"
    higher_is_better = True


class AccuracyAtT2(_OneValue):
    """Accuracy@t2: the fraction of problems answered right at turn 2."""

    key = "acc_t2"
    higher_is_better = True


class DeltaT1T2(_OneValue):
    """Δ(t1, t2) = Accuracy@t2 − Accuracy@t1 (= Δ^{i→c} − Δ^{c→i})."""

    key = "delta"
    higher_is_better = True


class DeltaIncorrectToCorrect(_OneValue):
    """Δ^{i→c}: the fraction of ALL problems wrong at turn 1 and right at turn 2."""

    key = "delta_i2c"
    higher_is_better = True


class DeltaCorrectToIncorrect(_OneValue):
    """Δ^{c→i}: the fraction of ALL problems right at turn 1 and wrong at turn 2."""

    key = "delta_c2i"
    higher_is_better = False


class IncorrectToCorrectRate(_OneValue):
    """The fraction of the problems wrong at turn 1 that are right at turn 2 (0.0 if none was wrong)."""

    key = "rate_i2c"
    higher_is_better = True


class CorrectToIncorrectRate(_OneValue):
    """The fraction of the problems right at turn 1 that are wrong at turn 2 (0.0 if none was right)."""

    key = "rate_c2i"
    higher_is_better = False


SCALAR_METRICS: dict[str, type[_OneValue]] = {
    cls.key: cls
    for cls in (
        AccuracyAtT1,
        AccuracyAtT2,
        DeltaT1T2,
        DeltaIncorrectToCorrect,
        DeltaCorrectToIncorrect,
        IncorrectToCorrectRate,
        CorrectToIncorrectRate,
    )
}
"""The one-value metric class for each key of ``SelfCorrectionMetrics.compute()``."""


def self_correction_collection(prefix: str = "", **metric_kwargs: Any) -> MetricCollection:
    """All seven one-value metrics in a ``MetricCollection``, keyed ``<prefix><key>`` (e.g. ``val/acc_t1``).

    The members have identical states, so the collection's compute groups keep one copy of the counts after the
    first update. Pass the collection to ``self.log_dict`` (with ``on_epoch=True`` unless you call it as forward).

    Args:
        prefix: prepended to every key.
        **metric_kwargs: passed to every member (e.g. ``sync_on_compute=False``).
    """
    return MetricCollection({key: cls(**metric_kwargs) for key, cls in SCALAR_METRICS.items()}, prefix=prefix)


def turn_pairs(turns: int) -> list[tuple[int, int]]:
    """The (earlier, later) turn pairs an N-turn evaluation reports: each consecutive pair, then (1, N) when N > 2."""
    pairs = [(t - 1, t) for t in range(2, turns + 1)]
    return pairs + [(1, turns)] if turns > 2 else pairs


def pair_values(first: int, second: int, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """``SelfCorrectionMetrics`` values of turns (first, second) under names that say which turns.

    (1, 2) keeps the paper's names (``acc_t1``, ``delta_i2c`` ...). Another pair adds ``acc_t<second>`` when the turns
    are consecutive (the accuracies of earlier turns come with earlier pairs) and ``<name>_t<first>_t<second>`` for
    the rest: ``delta_i2c_t2_t3`` is the share of problems wrong at turn 2 and right at turn 3.
    """
    if (first, second) == (1, 2):
        return dict(values)
    out = {f"acc_t{second}": values["acc_t2"]} if second == first + 1 else {}
    out.update({f"{k}_t{first}_t{second}": v for k, v in values.items() if not k.startswith("acc_")})
    return out
