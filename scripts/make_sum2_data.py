"""Write the bundled problem files of the self-correction replication (``bundled:sum2_train``, ``bundled:sum2_test``).

Sums of two digits (0-9), each asked in seven phrasings: 700 problems. The split is by the unordered pair of
addends, so no test problem shares its arithmetic with a training problem (neither ``3 + 5`` nor ``5 + 3``, in any
phrasing, is in both). Pairs go to the test split in a seeded random order until it holds at least
``--test-size`` problems. Deterministic: the committed files are this script's output.

Why this family: a probe of SmolLM2-135M-Instruct at temperature 0.7 (48 problems each) found single-digit sums at
~46% and three-digit-addend sums, two-digit sums and one-step word problems at 0-19%; only the first sits in the
25-60% band where GRPO groups carry signal.

    python -m scripts.make_sum2_data --out mgrpo_pl/data/files
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

PHRASINGS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "Add {a} and {b}.",
    "What do you get when you add {a} to {b}?",
    "Find the value of {a} + {b}.",
    "What is {a} plus {b}?",
)


def problems() -> list[dict[str, str]]:
    return [
        {"id": f"sum2-{a}-{b}-{p}", "question": phrasing.format(a=a, b=b), "answer": str(a + b)}
        for a, b in itertools.product(range(10), repeat=2)
        for p, phrasing in enumerate(PHRASINGS)
    ]


def split(rows: list[dict[str, str]], test_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test), split by unordered addend pair; the test split takes pairs until it reaches ``test_size``."""

    def pair(row: dict[str, str]) -> tuple[int, int]:
        a, b = (int(x) for x in row["id"].split("-")[1:3])
        return (min(a, b), max(a, b))

    pairs = sorted({pair(r) for r in rows})
    random.Random(seed).shuffle(pairs)
    test_pairs: set[tuple[int, int]] = set()
    count = 0
    for p in pairs:
        if count >= test_size:
            break
        test_pairs.add(p)
        count += sum(pair(r) == p for r in rows)
    return [r for r in rows if pair(r) not in test_pairs], [r for r in rows if pair(r) in test_pairs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("mgrpo_pl/data/files"))
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = split(problems(), args.test_size, args.seed)
    for name, rows in (("sum2_train", train), ("sum2_test", test)):
        with (args.out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} problems")


if __name__ == "__main__":
    main()
