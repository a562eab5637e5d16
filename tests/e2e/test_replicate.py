"""scripts/replicate.py end to end on the tiny model: both trainings, the five evaluations, the table, the statistics,
the audit and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_replication_script_writes_table_plot_and_report(tiny_model_path, tmp_path):
    from scripts import replicate

    out = tmp_path / "replication"
    work = tmp_path / "work"
    argv = [
        f"--config={ROOT / 'configs' / 'tiny.yaml'}",
        f"--out={out}",
        f"--work={work}",
        "--steps=2",
        "--val-every=1",
        "--eval-samples=2",
        "--test=[{source: arithmetic, name: arith_eval, options: {n: 3, seed: 5, max_value: 9}}]",
        "--second-guide=Let me check the sum again.",
        "--",
        f"--model.model={tiny_model_path}",
    ]
    report = replicate.main(argv)
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["method"] for r in rows] == [
        "Intrinsic self-correction (untrained)",
        "Untrained (continuation)",
        "GRPO",
        "MGRPO",
        "MGRPO (second guide)",
    ]
    assert {r["benchmark"] for r in rows} == {"arith_eval"}
    assert "| arith_eval |" in (out / "table.md").read_text()
    assert (out / "training.png").stat().st_size > 10_000
    stats = json.loads((out / "stats.json").read_text())
    assert "McNemar" in (out / "stats.md").read_text() and stats
    assert "MGRPO (second guide)" in (out / "audit.md").read_text()
    second = [json.loads(line) for p in (out / "eval" / "MGRPO_second_guide").glob("*.jsonl") for line in p.open()]
    assert {r["guide"] for r in second} == {"Let me check the sum again."}
    saved = json.loads((out / "run.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["checkpoints"]) == {"GRPO", "MGRPO"}
    for method, ckpt in saved["checkpoints"].items():
        assert Path(ckpt).is_file(), method
    # Each evaluation wrote per-problem JSONL: 3 problems x 2 samples.
    for method in ("GRPO", "MGRPO"):
        records = [json.loads(line) for p in (out / "eval" / method).glob("test_*.jsonl") for line in p.open()]
        assert len(records) == 6, method
    # The two trainings differ only in layer 2: MGRPO logged layer-2 losses, GRPO did not train layer 2.
    grpo_cfg = (Path(saved["log_dirs"]["GRPO"]) / "config.yaml").read_text()
    assert "layer2: false" in grpo_cfg
    # Evaluating again with --reuse-runs trains nothing: the same checkpoints are evaluated.
    again = replicate.main(["--reuse-runs", *argv])
    assert again["checkpoints"] == report["checkpoints"]
    assert sorted(p.name for p in (work / "GRPO" / "lightning_logs").iterdir()) == ["version_0"]
