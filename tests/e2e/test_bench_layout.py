"""scripts/bench/layout.py end to end on the tiny model: every layout runs, does the same work, and the cheaper
layouts compute fewer positions. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--model=tiny",
    "--problems=2",
    "--num-generations=4",
    "--kept-per-problem=2",
    "--num-corrections=2",
    "--prompt-length=6",
    "--completion-length=8",
    "--guide-length=3",
    "--rounds=2",
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scripts.bench.layout", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def report(tmp_path_factory, mgrpo_cache_dir) -> dict:
    out = tmp_path_factory.mktemp("bench_layout") / "layout.json"
    proc = _run([*SMALL, "--micro-batch-tokens=10000", f"--cache-dir={mgrpo_cache_dir}", f"--out={out}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tree |" in proc.stdout  # the Markdown table is printed
    return json.loads(out.read_text())


def test_every_layout_reports_its_passes(report):
    assert set(report["results"]) == {"padded", "shared", "tree"}
    assert report["rows"] == 2 * 4 + 2 * 2 * 2
    assert report["trained_tokens"] == report["rows"] * 8
    for name, r in report["results"].items():
        assert len(r["rounds_s"]) == 2 and min(r["rounds_s"]) > 0, name
        assert r["best_s"] == min(r["rounds_s"]), name
        assert r["micro_batches"] == 1, name  # everything fits the 10,000-token budget


def test_layouts_do_the_same_work_on_fewer_positions(report):
    r = report["results"]
    for name in ("shared", "tree"):
        assert r[name]["max_grad_diff_vs_padded"] < 1e-4, name
    # one row: 6-token prompt + 8-token completion; a layer-2 query is 6 + 7 + 3 = 16 tokens
    l1_rows, l2_rows = 8, 8
    assert r["padded"]["computed_tokens"] == (l1_rows + l2_rows) * (16 + 8)  # left-padded to the longest row
    # shared: 2 prompts of 5 + 4 queries of 15 as prefixes (padded to 15), then 16 suffixes of 8 tokens
    assert r["shared"]["computed_tokens"] == 6 * 15 + 16 * 8
    # tree: the layer-2 groups start from their layer-1 rows' caches, which hold the query's first 13 tokens, so
    # the prefixes are the 2 prompts (5 columns), each of the 4 groups computes 2 more query tokens, then the same
    # 16 suffixes
    assert r["tree"]["computed_tokens"] == 2 * 5 + 8 * 8 + 4 * 2 + 8 * 8
    assert r["tree"]["computed_tokens"] < r["shared"]["computed_tokens"] < r["padded"]["computed_tokens"]


@pytest.mark.parametrize(
    "flag, named",
    [
        ("--layouts=padded,ragged", "--layouts"),
        ("--layouts=tree,tree", "--layouts"),
        ("--kept-per-problem=5", "--kept-per-problem"),
        ("--micro-batch-tokens=0", "--micro-batch-tokens"),
        ("--guide-length=-2", "--guide-length"),
    ],
)
def test_bad_flags_name_the_flag(mgrpo_cache_dir, flag, named):
    proc = _run([*SMALL, flag, f"--cache-dir={mgrpo_cache_dir}"])
    error = proc.stderr.strip().splitlines()[-1]  # argparse's usage lines list every flag; the error is the last
    assert proc.returncode == 2 and named in error, proc.stderr
