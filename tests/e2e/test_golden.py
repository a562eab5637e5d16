"""Golden runs: a seeded 3-step MGRPO fit logs the same values as when the numbers in ``golden/`` were recorded.

Two runs through the real ``mgrpo fit``: the tiny model (parity reward, so layer 2 keeps queries) and the demo model
(SmolLM2-135M on the bundled addition problems, with the demo's bf16 reference, gradient checkpointing and token
budget). Every scalar logged to TensorBoard is compared exactly, except wall-clock times, so a refactor that moves
code but changes any loss, reward, advantage, selection or transition by one float32 ulp fails here.

Bit-identity holds for one platform only: another CPU instruction set, thread count or torch build rounds matmuls
differently, and sampling then diverges. The recorded platform is part of the file; elsewhere the test skips and says
so. Record again (only when a change is meant to alter the numbers) with
``MGRPO_RECORD_GOLDEN=1 python -m pytest tests/e2e/test_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgrpo_pl.cli import cli_main

GOLDEN = Path(__file__).resolve().parent / "golden"

COMMON = [
    "fit",
    "--config",
    "configs/tiny.yaml",
    "--trainer.max_steps=3",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_checkpointing=false",
    "--data.reward=plugin_rewards.ParityReward",
]
RUNS = {
    "tiny": ["--data.train.options={n: 6, seed: 0, max_value: 9}"],
    # The demo's model settings on its problems; generation shortened so three steps take about a minute.
    "demo": [
        "--data.reward=mgrpo_pl.rewards.MathReward",
        "--data.train.source=jsonl",
        "--data.train.options={path: 'bundled:add_1digit', id_field: id}",
        "--model.efficiency.reference_dtype=bfloat16",
        "--model.efficiency.gradient_checkpointing=true",
        "--model.efficiency.micro_batch_tokens=1024",
        "--model.optimizer.init_args.lr=1.0e-5",
        "--data.rollout.sampling.max_new_tokens=40",
        "--data.rollout.sampling.temperature=0.7",
    ],
}


def platform() -> str:
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def logged(model_path: Path, root: Path, name: str, *extra: str) -> dict[str, list[list[float]]]:
    """``{tag: [[step, value], ...]}`` of every scalar the run logged, wall-clock times left out."""
    cli_main([*COMMON, f"--model.model={model_path}", f"--trainer.default_root_dir={root}", *RUNS[name], *extra])
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if not t.startswith("time/")]
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in sorted(tags)}


def check(name: str, model_path: Path, root: Path, *extra: str) -> None:
    """The run ``name`` (with ``extra`` flags) against its recorded values."""
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MGRPO_RECORD_GOLDEN") == "1":
        if extra:
            pytest.skip("only the plain runs are recorded")
        scalars = logged(model_path, root, name)
        path.write_text(json.dumps({"platform": platform(), "scalars": scalars}, indent=1) + "\n")
        pytest.skip(f"recorded {len(scalars)} tags into {path}")
    recorded = json.loads(path.read_text())
    if recorded["platform"] != platform():
        pytest.skip(f"golden values were recorded on {recorded['platform']}; this is {platform()}")
    now = logged(model_path, root, name, *extra)
    assert sorted(now) == sorted(recorded["scalars"]), "the set of logged tags changed"
    changed = {tag: (recorded["scalars"][tag], now[tag]) for tag in now if now[tag] != recorded["scalars"][tag]}
    assert not changed, f"values differ from the golden run (recorded, now): {changed}"
    # Values that never vary would pin nothing about which problems, samples or selections a step used.
    assert len({v for _, v in now["train/loss_layer1"]}) == 3, now["train/loss_layer1"]
    assert any(v > 0 for _, v in now["layer2/kept_queries"]), now["layer2/kept_queries"]


def test_tiny_run_matches_golden(tiny_model_path, tmp_path):
    check("tiny", tiny_model_path, tmp_path)


def test_two_layers_named_are_the_golden_mgrpo_run(tiny_model_path, tmp_path):
    """``--data.rollout.num_layers=2`` is today's MGRPO exactly: the layer loop adds nothing at N = 2."""
    check("tiny", tiny_model_path, tmp_path, "--data.rollout.num_layers=2")


def test_demo_model_run_matches_golden(smollm2_path, tmp_path):
    check("demo", smollm2_path, tmp_path)
