"""A training DataLoader that resumes mid-epoch at the exact batch, and the RNG state that goes with it.

Lightning saves and restores the ``state_dict`` of any train loader that has one, before it creates the iterator.
The loader counts the batches that were really used (the DataModule reports each one as it turns it into
rollouts), not the ones the fetcher prefetched, so a checkpoint taken after step k resumes with batch k+1.

The DataModule also checkpoints the random generators (``mgrpo_pl.runtime.rng.RngState``) and restores them right
before the first rollout after a resume: anything that runs in between (the loader's iterator, validation) then
cannot shift the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class EpochSampler(DistributedSampler):
    """Each epoch's order is a permutation seeded by ``(seed, epoch)``; the first ``skip`` indices can be skipped once.

    Under data parallelism (``num_replicas > 1``) every rank reads its own block of each global batch: with
    per-rank batch size b, global batch k is ``order[k*W*b : (k+1)*W*b]`` and rank r takes the r-th b-sized block of
    it, so W ranks together see exactly the batches one process with batch size ``W*b`` would see. The order is
    padded by wrapping around to a whole number of global batches, so every rank has the same number of batches
    (a rank that ran out early would leave the others waiting in a collective). With one replica nothing is padded.

    It subclasses ``DistributedSampler`` so that Lightning keeps it as it is instead of wrapping it in its own
    distributed sampler (which would re-create the loader and lose its resumable state).

    Args:
        size: Number of items.
        shuffle: Permute each epoch (else the natural order).
        seed: Base seed of the permutations.
        batch_size: Items per batch on each rank (the block size of the sharding).
        num_replicas: Data-parallel ranks.
        rank: This rank.
    """

    def __init__(
        self, size: int, shuffle: bool, seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        # DistributedSampler's own init would ask torch.distributed for the world; the fields are set here instead.
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = max(int(batch_size), 1)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.skip = 0
        self.skip_epoch = 0
        self.drop_last = False
        span = self.batch_size * num_replicas
        self.total_size = size if num_replicas == 1 else -(-size // span) * span
        self.num_samples = self.total_size // num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The global order of this epoch (every rank computes the same one)."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def shard(self) -> list[int]:
        """This rank's indices of this epoch, in order."""
        order = self.order()
        if self.num_replicas == 1:
            return order
        if order:
            order = (order * -(-self.total_size // len(order)))[: self.total_size]
        b, span = self.batch_size, self.batch_size * self.num_replicas
        first = self.rank * b
        return [i for start in range(0, len(order), span) for i in order[start + first : start + first + b]]

    def __iter__(self) -> Iterator[int]:
        # A resume skips only within the epoch it happened in. A checkpoint from an epoch's last step resumes with
        # the next epoch (Lightning moves on to it before iterating), which must then start from its beginning.
        skip, self.skip = (self.skip if self.epoch == self.skip_epoch else 0), 0
        return iter(self.shard()[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A DataLoader over an ``EpochSampler`` whose position survives a checkpoint; ``num_replicas`` and ``rank``
    give this rank's shard under data parallelism (see ``EpochSampler``).

    ``mark_used()`` must be called once per batch actually consumed; ``state_dict`` records the epoch and that
    count, ``load_state_dict`` makes the next iterator start after the used batches.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        **kwargs: Any,
    ) -> None:
        self.epoch_sampler = EpochSampler(len(dataset), shuffle, seed, batch_size, num_replicas, rank)
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
        self.epoch_sampler.skip_epoch = self._epoch_of_count
