"""Write problems.jsonl: 64 countdown problems with three numbers from 1 to 9, each reachable by construction.

python make_problems.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from countdown_reward import evaluate


def problems(n: int = 64, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        expression = f"({a} {rng.choice('+-*')} {b}) {rng.choice('+-*')} {c}"
        value, _ = evaluate(expression)
        if value.denominator != 1 or value < 0:
            continue
        numbers = [a, b, c]
        rng.shuffle(numbers)
        rows.append(
            {
                "id": f"countdown-{len(rows)}",
                "question": f"Using the numbers {numbers}, each exactly once, reach {int(value)}.",
                "answer": json.dumps({"target": int(value), "numbers": numbers}),
            }
        )
    return rows


if __name__ == "__main__":
    path = Path(__file__).with_name("problems.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in problems()))
    print(f"wrote {path}")
