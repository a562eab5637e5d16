"""What MGRPO measures: the self-correction metrics (torchmetrics), per-set reports, and a step's loss statistics.

- ``transitions``: Acc@t1, Acc@t2, Δ, Δi→c, Δc→i and the conditional rates, as torchmetrics classes;
- ``report``: per-problem evaluation records summarised into the paper's Table 2;
- ``step_stats``: a training step's sums over micro-batches and its logged ``train/`` values.
"""

from mgrpo_pl.metrics.transitions import (
    SCALAR_METRICS,
    AccuracyAtT1,
    AccuracyAtT2,
    CorrectToIncorrectRate,
    DeltaCorrectToIncorrect,
    DeltaIncorrectToCorrect,
    DeltaT1T2,
    IncorrectToCorrectRate,
    SelfCorrectionMetrics,
    pair_values,
    self_correction_collection,
    turn_pairs,
)

__all__ = [
    "SCALAR_METRICS",
    "AccuracyAtT1",
    "AccuracyAtT2",
    "CorrectToIncorrectRate",
    "DeltaCorrectToIncorrect",
    "DeltaIncorrectToCorrect",
    "DeltaT1T2",
    "IncorrectToCorrectRate",
    "SelfCorrectionMetrics",
    "pair_values",
    "self_correction_collection",
    "turn_pairs",
]
