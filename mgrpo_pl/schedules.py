"""Learning-rate schedules by name (the paper: cosine with a 3% linear warm-up)."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from mgrpo_pl.errors import ConfigError

ScheduleName = Literal["constant", "linear", "cosine"]


def warmup_schedule(
    optimizer: Optimizer,
    name: ScheduleName,
    total_steps: int,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then ``name`` decay to ``min_lr_ratio * lr``."""
    if name not in ("constant", "linear", "cosine"):
        raise ConfigError(f"--model.optim.lr_schedule must be constant, linear or cosine, got {name!r}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"--model.optim.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    total = max(int(total_steps), 1)
    warmup = int(math.ceil(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return LambdaLR(optimizer, factor)
