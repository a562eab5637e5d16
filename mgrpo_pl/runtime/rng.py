"""The process's random generators as one value: captured into a checkpoint, or kept around code that reseeds them.

Sampling in generation draws from the global torch RNG, so anything that reseeds or draws from it between two
rollouts (building a model, vLLM's start-up, a resumed loader's iterator) would shift which completions a run samples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


class RngState:
    """Python's, torch's CPU and (when present) CUDA generators, and NumPy's when asked: checkpoints leave NumPy's
    out, because its state pickles as NumPy objects that ``torch.load(weights_only=True)`` refuses."""

    @staticmethod
    def capture(numpy: bool = False) -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if numpy:
            state["numpy"] = np.random.get_state()
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        if "numpy" in state:
            np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def rng_kept() -> Iterator[None]:
    """Run the block, then put every generator back as it was before it."""
    state = RngState.capture(numpy=True)
    try:
        yield
    finally:
        RngState.restore(state)
