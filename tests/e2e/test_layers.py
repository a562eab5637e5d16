"""N correction layers through the real `mgrpo fit` and `mgrpo test`: one layer is one-round GRPO, three layers train
layer 3 on the tiny and the demo model, and evaluation then runs three turns.

(Two layers named explicitly reproduce the golden MGRPO run: ``test_golden.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgrpo_pl.cli import cli_main
from mgrpo_pl.metrics.report import load_records

TINY = ["--config", "configs/tiny.yaml", "--data.reward=plugin_rewards.ParityReward"]


def _scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run logged except wall-clock times."""
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if not t.startswith("time/")]
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


def _fit(model: Path, root: Path, *flags: str, base: list[str] = TINY) -> dict[str, list[tuple[int, float]]]:
    cli_main(["fit", *base, f"--model.model={model}", f"--trainer.default_root_dir={root}", *flags])
    return _scalars(root)


def test_one_layer_is_the_one_round_grpo_run(tiny_model_path, tmp_path):
    flags = ["--trainer.max_steps=2", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0"]
    one = _fit(tiny_model_path, tmp_path / "n1", "--data.rollout.num_layers=1", *flags)
    off = _fit(tiny_model_path, tmp_path / "off", "--data.rollout.layer2=false", *flags)
    assert one == off
    assert not any(tag.startswith("layer2/") for tag in one)
    assert all(v == 0 for _, v in one["train/loss_layer2"])


def test_three_layers_train_and_test_reports_three_turns(tiny_model_path, tmp_path, capsys):
    three = ["--data.rollout.num_layers=3", "--data.rollout.layer_overrides={3: {num_corrections: 3}}"]
    # The layer weights are a model setting: `mgrpo test` takes them from the checkpoint.
    logged = _fit(
        tiny_model_path, tmp_path, *three, "--model.loss.layer_weights={3: 0.5}", "--trainer.limit_val_batches=0"
    )
    assert [step for step, _ in logged["train/loss_layer3"]] == [0, 1, 2]
    kept = [v for _, v in logged["layer3/kept_queries"]]
    assert any(v > 0 for v in kept)
    # Layer 3's H = 3 samples per kept query, against layer 2's H = 2 (configs/tiny.yaml).
    tokens = [v for _, v in logged["tokens/layer3"]]
    assert all((k > 0) == (t > 0) for k, t in zip(kept, tokens))
    assert any(v != 0 for _, v in logged["train/loss_layer3"])
    assert "reward/layer3" in logged and "layer3/probe_accuracy" in logged

    ckpt = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    cli = cli_main(
        ["test", *TINY, f"--model.model={tiny_model_path}", f"--trainer.default_root_dir={tmp_path / 'test'}"]
        + [f"--model.results_dir={tmp_path / 'test'}", f"--ckpt_path={ckpt}", *three]
    )
    assert cli.model.loss_settings.layer_weights == {3: 0.5}
    metrics = cli.trainer.callback_metrics
    assert {"test/arith_test/acc_t3", "test/arith_test/delta_i2c_t1_t3", "test/arith_test/delta_c2i_t2_t3"} <= set(
        metrics
    )
    records = load_records(next((tmp_path / "test").glob("test_arith_test_*.jsonl")))
    assert records and all("correct_t3" in r and "turn4" not in r for r in records)
    assert float(metrics["test/arith_test/acc_t3"]) == pytest.approx(
        sum(r["correct_t3"] for r in records) / len(records), abs=1e-6
    )
    printed = capsys.readouterr().out
    assert "Acc@t3" in printed and "Δi→c(t1,t3)" in printed


def test_three_layers_on_the_demo_model(smollm2_path, tmp_path):
    """The demo's model, problems and settings with a third layer, generation shortened to 32 tokens."""
    logged = _fit(
        smollm2_path,
        tmp_path,
        "--data.rollout.num_layers=3",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        "--data.rollout.sampling.max_new_tokens=32",
        # Without the demo's checkpoint callback (a 1.6 GB file per run); the transformers engine starts in a second
        # where vLLM takes a minute (the engine is not what this tests: it only serves generate calls).
        "--trainer.callbacks=[{class_path: callbacks.RolloutCallback, init_args: {engine: transformers}}]",
        base=["--config", "configs/demo.yaml"],
    )
    assert len(logged["train/loss_layer3"]) == 3
    assert any(v > 0 for _, v in logged["layer3/kept_queries"]), logged["layer3/kept_queries"]
    assert any(v != 0 for _, v in logged["train/loss_layer3"])
