"""The examples/ projects run from their own folders, as their READMEs say, and their parts do what they claim."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mgrpo_pl.cli import main

COUNTDOWN = Path(__file__).resolve().parents[2] / "examples" / "countdown"


@pytest.fixture
def in_countdown(monkeypatch):
    monkeypatch.chdir(COUNTDOWN)
    monkeypatch.setattr(sys, "path", [str(COUNTDOWN), *sys.path])  # main() adds the folder too; undone after
    return COUNTDOWN


GOLD = json.dumps({"target": 46, "numbers": [8, 5, 6]})
CASES = {
    "right": ("I try 8 times 5, plus 6.\n8 * 5 + 6 = 46", 1.0),
    "answer prefix": ("Answer: (8 * 5) + 6", 1.0),
    "wrong value": ("8 * 6 - 5", 0.0),  # 43
    "number reused": ("8 * 5 + 6 + 0", 0.0),  # 0 is not given
    "number missing": ("8 * 5 + 6 - 6 + 6", 0.0),
    "not an expression": ("It is forty-six.", 0.0),
    "code is not run": ("__import__('os').system('true')", 0.0),
    "division by zero": ("8 / (5 - 5) + 6", 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_countdown_reward_on_written_cases(case, in_countdown):
    from countdown_reward import CountdownReward

    text, expected = CASES[case]
    assert CountdownReward()([text], [GOLD]).tolist() == [expected]


def test_turn_two_reads_the_correction_expression(in_countdown):
    from countdown_reward import CountdownReward

    assert CountdownReward().final_answer("Wait, let me redo it.\n(8 * 5) + 6 = 46").text == "(8 * 5) + 6"
    assert CountdownReward().final_answer("Yes, that is right.") is None


def test_countdown_trains_from_its_folder(in_countdown, tiny_model_path, tmp_path, capsys):
    flags = [f"--model.model={tiny_model_path}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2"]
    try:
        main(
            [
                "fit",
                "--config",
                "countdown.yaml",
                *flags,
                "--trainer.val_check_interval=2",
                "--trainer.limit_val_batches=1",
            ]
        )
    except SystemExit as exit_info:
        pytest.fail(f"exit {exit_info.code}: {capsys.readouterr().err[-2000:]}")
    out = capsys.readouterr().out
    assert "train rollouts (all steps)" in out and "val/countdown" in out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 1/2", "step 2/2"]


OWN_MODULE = Path(__file__).resolve().parents[2] / "examples" / "own_module"


def test_own_module_example_trains_and_validates_two_turns(tiny_model_path, tmp_path, monkeypatch):
    """The example's own LightningModule and DataModule, with mgrpo_pl's parts, train 2 steps on the tiny model from
    the example's folder, move the policy (no weight decay: only a non-zero policy gradient moves it), and log the
    two-turn validation. The parity reward gives a random model's groups non-zero advantages."""
    from transformers import AutoModelForCausalLM

    from plugin_rewards import ParityReward

    monkeypatch.chdir(OWN_MODULE)
    monkeypatch.setattr(sys, "path", [str(OWN_MODULE), *sys.path])
    from grpo import main as own_main

    reward = ParityReward()
    module = own_main(["--model", str(tiny_model_path), "--steps", "2", "--root", str(tmp_path)], reward=reward)
    # 2 steps x 2 problems x G=4 samples, then the 4 validation problems' two turns.
    assert [len(call) for call in reward.calls] == [8, 8, 4, 4]
    metrics = module.trainer.callback_metrics
    assert module.trainer.global_step == 2
    assert {"train/loss", "val/acc_t1", "val/acc_t2", "val/delta_i2c", "val/delta_c2i"} <= set(metrics)
    assert 0.0 <= float(metrics["val/acc_t1"]) <= 1.0 and 0.0 <= float(metrics["val/acc_t2"]) <= 1.0
    start = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    moved = [n for n, p in module.policy.state_dict().items() if not torch.equal(p, start[n])]
    assert moved, "two optimizer steps changed no weight"
