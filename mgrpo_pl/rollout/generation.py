"""Engine calls of a rollout: one call per phase, or one per problem under per-problem seeds, and row selection."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mgrpo_pl.rollout.engines.base import GenerationEngine
from mgrpo_pl.rollout.types import Generation, SamplingConfig


def generate(
    engine: GenerationEngine,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    n: int,
    owners: list[int],
    seeds: list[int] | None,
) -> Generation:
    """One engine call for all prompts; or, with per-problem ``seeds``, one call per problem (``owners[i]`` is
    prompt i's problem, non-decreasing) with torch's RNG seeded by that problem's seed.

    An engine whose ranks must move in lockstep (``engine.lockstep``: a sharded policy that generates with
    collectives) is called even with no prompts, so every rank makes the same calls.
    """
    lockstep = bool(getattr(engine, "lockstep", False))
    if seeds is None:
        if not prompts and not lockstep:
            return Generation([], [], [], [])
        return engine.generate(prompts, sampling, n=n)
    if any(a > b for a, b in zip(owners, owners[1:])):
        raise ValueError("prompts must be grouped by problem")
    parts = []
    for problem, seed in enumerate(seeds):
        rows = [i for i, owner in enumerate(owners) if owner == problem]
        if not rows and not lockstep:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed(seed)  # fork_rng restores the CPU state; CUDA sampling needs its own
            parts.append(engine.generate([prompts[i] for i in rows], sampling, n=n))
    with_logprobs = bool(parts) and all(part.logprobs is not None for part in parts)
    return Generation(
        token_ids=[t for part in parts for t in part.token_ids],
        texts=[t for part in parts for t in part.texts],
        finished=[f for part in parts for f in part.finished],
        logprobs=[lp for part in parts for lp in part.logprobs] if with_logprobs else None,  # type: ignore[union-attr]
    )


def take(gen: Generation, rows: Sequence[int]) -> Generation:
    """The given rows of a generation, in that order."""
    return Generation(
        token_ids=[gen.token_ids[i] for i in rows],
        texts=[gen.texts[i] for i in rows],
        finished=[gen.finished[i] for i in rows],
        logprobs=[gen.logprobs[i] for i in rows] if gen.logprobs is not None else None,
    )


def split_first(gen: Generation, per: int) -> tuple[Generation, Generation]:
    """Split ``per`` rows per query into each query's first row and the others (both query-major)."""
    queries = range(len(gen) // per)
    return take(gen, [q * per for q in queries]), take(gen, [q * per + h for q in queries for h in range(1, per)])
