"""Benchmark: how many answers per second ``MathReward`` scores on this machine.

Scores N synthetic GSM8K-style items twice: cold (the first call, which starts the worker pool) and warm (a second
call with a fresh set of N items, so math-verify's small parse cache cannot help). Completions look like model output
("... so the answer is \\boxed{N}"), a mix of right and wrong answers and a few without any answer; golds are GSM8K
solutions ending in "#### N". The generator knows which completions are right, so the run also checks the reward.

Usage (from the repository root, or anywhere once the package is installed):
    python -m scripts.bench.rewards --n 1000 --workers 2 --timeout 5
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch  # imported up front, as in a trainer, so "cold" measures the pool start and not torch's import

from mgrpo_pl.rewards import MathReward

_NAMES = ("Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Ken")
_ITEMS = ("clips", "dollars", "pages", "apples", "marbles", "cookies")


def _fmt(value: int, thousands: bool) -> str:
    return f"{value:,}" if thousands else str(value)


def make_items(n: int, seed: int) -> tuple[list[str], list[str], list[float]]:
    """Return ``(completions, golds, expected)`` for ``n`` GSM8K-style problems (about 60% answered correctly)."""
    rng = random.Random(seed)
    completions, golds, expected = [], [], []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(2, 400), rng.randint(2, 60)
        answer = a * b + rng.randint(1, 50)  # never equal to a*b, the last number of an unfinished completion
        golds.append(
            f"{name} gets {a} {item} each day for {b} days, so {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {item}.\n"
            f"Adding the rest gives {_fmt(answer, False)} {item}.\n#### {_fmt(answer, answer >= 1000)}"
        )
        roll = rng.random()
        reasoning = (
            f"Let's think step by step. {name} gets {a} {item} a day for {b} days, which is {a} \\times {b} = "
            f"{a * b} {item}. Then we add the remaining {item}."
        )
        if roll < 0.6:
            shown = _fmt(answer, rng.random() < 0.3)
            completions.append(f"{reasoning} So the answer is \\boxed{{{shown}}}.")
            expected.append(1.0)
        elif roll < 0.95:
            wrong = answer + rng.choice([-10, -2, -1, 1, 3, 100])
            completions.append(f"{reasoning} So the answer is \\boxed{{{wrong}}}.")
            expected.append(0.0)
        else:
            completions.append(f"{reasoning} I am not sure how to finish this")
            expected.append(0.0)
    return completions, golds, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="items per call")
    parser.add_argument("--workers", type=int, default=2, help="reward worker processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="hard per-item timeout in seconds")
    parser.add_argument("--start-method", default="forkserver", help="multiprocessing start method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cold_items = make_items(args.n, args.seed)
    warm_items = make_items(args.n, args.seed + 1)
    with MathReward(timeout_s=args.timeout, num_workers=args.workers, start_method=args.start_method) as reward:
        results = {}
        for label, (completions, golds, expected) in (("cold", cold_items), ("warm", warm_items)):
            start = time.perf_counter()
            scores = reward(completions, golds)
            elapsed = time.perf_counter() - start
            agree = sum(float(s) == e for s, e in zip(scores.tolist(), expected, strict=True)) / len(expected)
            results[label] = elapsed
            print(
                f"{label}: {args.n} answers in {elapsed:.2f} s = {args.n / elapsed:.0f} answers/s "
                f"(workers={args.workers}, mean reward {scores.mean().item():.3f}, "
                f"agreement with the generator's labels {agree:.1%})"
            )
        print(f"stats: {reward.stats()}")
        print(
            f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"start method {args.start_method}"
        )


if __name__ == "__main__":
    main()
