"""The examples/ projects run from their own folders, as their READMEs say, and their parts do what they claim."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
