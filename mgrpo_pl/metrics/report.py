"""Table-2 rows from the per-problem JSONL that evaluation writes (one row per problem and sample).

The JSONL is the ground truth: every figure here is recomputed from it, so a reader can check each transition.
With k samples per problem, each sample index is scored as its own pass over the benchmark and the table reports
the mean over passes with the standard deviation as the spread.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from mgrpo_pl.metrics import SelfCorrectionMetrics, pair_values, turn_pairs

COLUMNS = (
    ("acc_t1", "Acc.@t1"),
    ("acc_t2", "Acc.@t2"),
    ("delta", "Δ(t1,t2)"),
    ("delta_i2c", "Δi→c(t1,t2)"),
    ("delta_c2i", "Δc→i(t1,t2)"),
)


def load_records(path: str | Path) -> list[dict[str, object]]:
    """Rows of one evaluation JSONL file; each needs ``correct_t1`` and ``correct_t2``."""
    rows = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("correct_t1", "correct_t2"):
                if key not in row:
                    raise ValueError(f"{path}, line {line_no}: missing {key!r}")
            rows.append(row)
    return rows


def summarize(records: Iterable[dict[str, object]]) -> dict[str, float]:
    """Mean over sample passes of each Table-2 metric, plus ``<key>_std`` (0 with one pass) and ``n``."""
    passes: dict[int, list[dict[str, object]]] = defaultdict(list)
    for row in records:
        passes[int(row.get("sample", 0))].append(row)
    if not passes:
        raise ValueError("no evaluation records to summarize")
    turns = 2
    while all(f"correct_t{turns + 1}" in row for rows in passes.values() for row in rows):
        turns += 1
    per_pass = []
    for rows in passes.values():
        values: dict[str, float] = {}
        for first, second in turn_pairs(turns):
            metric = SelfCorrectionMetrics()
            metric.update(*(torch.tensor([bool(r[f"correct_t{t}"]) for r in rows]) for t in (first, second)))
            values.update({k: float(v) for k, v in pair_values(first, second, metric.compute()).items()})
        per_pass.append(values)
    out: dict[str, float] = {"n": float(len(next(iter(passes.values())))), "samples": float(len(passes))}
    for key in per_pass[0]:
        values = [p[key] for p in per_pass]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _percent(summary: dict[str, float], key: str) -> str:
    text = f"{100 * summary[key]:.1f}"
    if summary.get("samples", 1) > 1:
        text += f" ± {100 * summary[f'{key}_std']:.1f}"
    return text


def columns(summaries: Iterable[dict[str, float]]) -> list[tuple[str, str]]:
    """The paper's five columns, then, when every summary has turns past the second, each later turn's accuracy and
    the i->c / c->i shares of each later pair (consecutive, then t1 -> tN)."""
    summaries = list(summaries)
    turns = 2
    while summaries and all(f"acc_t{turns + 1}" in s for s in summaries):
        turns += 1
    extra = []
    for first, second in turn_pairs(turns)[1:]:
        if second == first + 1:
            extra.append((f"acc_t{second}", f"Acc.@t{second}"))
        extra += [
            (f"delta_i2c_t{first}_t{second}", f"Δi→c(t{first},t{second})"),
            (f"delta_c2i_t{first}_t{second}", f"Δc→i(t{first},t{second})"),
        ]
    return [*COLUMNS, *extra]


def markdown_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """Rows of (benchmark, method, summary) as the paper's Table 2, in percent (more columns past two turns)."""
    cols = columns(summary for _, _, summary in rows)
    header = "| Benchmark | Method | " + " | ".join(title for _, title in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]
    for bench, method, summary in rows:
        lines.append(f"| {bench} | {method} | " + " | ".join(_percent(summary, k) for k, _ in cols) + " |")
    return "\n".join(lines)


def csv_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """The same rows as CSV with fractions (not percent), stds and counts."""
    buffer = io.StringIO()
    keys = [k for k, _ in columns(summary for _, _, summary in rows)]
    writer = csv.writer(buffer)
    writer.writerow(["benchmark", "method", *keys, *[f"{k}_std" for k in keys], "n", "samples"])
    for bench, method, s in rows:
        writer.writerow(
            [bench, method, *[s[k] for k in keys], *[s[f"{k}_std"] for k in keys], int(s["n"]), int(s["samples"])]
        )
    return buffer.getvalue()
