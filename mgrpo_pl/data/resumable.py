"""A training DataLoader that resumes mid-epoch at the exact batch, and the RNG state that goes with it.

Lightning saves and restores the ``state_dict`` of any train loader that has one, before it creates the iterator.
The loader counts the batches that were really used (the DataModule reports each one as it turns it into
rollouts), not the ones the fetcher prefetched, so a checkpoint taken after step k resumes with batch k+1.

Sampling in generation draws from the global torch RNG. ``RngState`` captures the generators that matter so the
DataModule can restore them right before the first rollout after a resume: anything that runs in between (the
loader's iterator, validation) then cannot shift the stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Each epoch's order is a permutation seeded by ``(seed, epoch)``; the first ``skip`` indices can be skipped once.

    Args:
        size: Number of items.
        shuffle: Permute each epoch (else the natural order).
        seed: Base seed of the permutations.
    """

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch."""
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0  # a resume skips only within the epoch it happened in
        return iter(self.order()[skip:])

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` whose position survives a checkpoint.

    ``mark_used()`` must be called once per batch actually consumed; ``state_dict`` records the epoch and that
    count, ``load_state_dict`` makes the next iterator start after the used batches.
    """

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool, seed: int, **kwargs: Any) -> None:
        self.epoch_sampler = EpochSampler(len(dataset), shuffle, seed)
        # A private generator keeps the iterator's base-seed draw off the global RNG that generation samples from.
        generator = torch.Generator().manual_seed(seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, generator=generator, **kwargs)
        self.used_in_epoch = 0
        self._epoch_of_count = 0

    def mark_used(self) -> None:
        if self.epoch_sampler.epoch != self._epoch_of_count:
            self._epoch_of_count, self.used_in_epoch = self.epoch_sampler.epoch, 0
        self.used_in_epoch += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_sampler.epoch, "used_in_epoch": self.used_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_sampler.epoch = self._epoch_of_count = int(state["epoch"])
        self.used_in_epoch = int(state["used_in_epoch"])
        self.epoch_sampler.skip = self.used_in_epoch * int(self.batch_size or 1)


class RngState:
    """The random generators generation depends on: python, torch CPU and (when present) CUDA."""

    @staticmethod
    def capture() -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
