"""The defaults are the safe ones: no remote code, checkpoints load weights only, model text is parsed, never run."""

from __future__ import annotations

import ast
import inspect
import logging
import warnings
from pathlib import Path

import pytest
import torch
from test_bad_input import _mgrpo

from mgrpo_pl.cli import cli_main
from mgrpo_pl.errors import CheckpointError
from mgrpo_pl.modeling import loading
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.rewards import MathReward
from mgrpo_pl.settings import LossSettings

REPO = Path(__file__).resolve().parents[2]


# -- safe defaults --------------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_unless_asked(tiny_model_path, monkeypatch):
    for fn in (MGRPOModule.__init__, loading.load_tokenizer, loading.load_causal_lm):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    calls = []
    for auto in ("AutoTokenizer", "AutoModelForCausalLM"):
        real = getattr(loading, auto).from_pretrained

        def spy(*args, _real=real, _name=auto, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(getattr(loading, auto), "from_pretrained", spy)
    module = MGRPOModule(model=str(tiny_model_path), loss=LossSettings(beta=0.1))
    module.configure_model()
    # tokenizer, policy, reference: every load said no to repository code
    assert calls == [("AutoTokenizer", False), ("AutoModelForCausalLM", False), ("AutoModelForCausalLM", False)]


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_checkpoints_load_weights_only_by_default(command, capsys):
    with pytest.raises(SystemExit):
        cli_main([command, "--config", str(REPO / "configs" / "tiny.yaml"), "--print_config"])
    assert "weights_only: true" in capsys.readouterr().out.splitlines()


class _Payload:
    """Unpickling this object runs code: it opens (creates) ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_that_runs_code_is_refused(tiny_model_path, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, ckpt)
    # Even when the environment asks torch to unpickle anything, `mgrpo` loads tensors and plain data only.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(
        CheckpointError, match=f"--ckpt_path {ckpt}: cannot read the checkpoint: Weights only load failed"
    ):
        _mgrpo(tiny_model_path, tmp_path, f"--ckpt_path={ckpt}", command="test")
    assert not marker.exists()
    # The control: unpickled without weights_only, the same file does run its code.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_checkpoint_hparams_cannot_turn_on_remote_code(tiny_model_path, tmp_path, trainer_test_calls):
    ckpt = tmp_path / "hp.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": str(tiny_model_path), "trust_remote_code": True}}, ckpt)
    with pytest.warns(UserWarning, match="the checkpoint's hyper-parameters set trust_remote_code=True; ignored"):
        cli = _mgrpo(tiny_model_path, tmp_path, f"--ckpt_path={ckpt}", command="test")
    assert cli.model.hparams.trust_remote_code is False
    assert trainer_test_calls[0]["ckpt_path"] == str(ckpt) and trainer_test_calls[0]["weights_only"] is True
    # The user's own flag is what turns it on.
    cli = _mgrpo(tiny_model_path, tmp_path, f"--ckpt_path={ckpt}", "--model.trust_remote_code=true", command="test")
    assert cli.model.hparams.trust_remote_code is True


def test_library_code_never_evaluates_text():
    banned = {"eval", "exec", "compile", "__import__"}
    found = []
    for root in ("mgrpo_pl", "callbacks"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in banned:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}()")
    assert found == []


@pytest.fixture(scope="module")
def reward():
    with MathReward(timeout_s=10.0, num_workers=1) as shared:
        yield shared


def test_model_output_is_parsed_never_run(reward, tmp_path):
    markers = [tmp_path / f"m{i}" for i in range(5)]
    code = [f"__import__('os').system('touch {m}')" for m in markers]
    completions = [
        f"The answer is \\boxed{{{code[0]}}}.",
        f"The final answer is {code[1]}",
        f"${code[2]}$",
        f"1+{code[3]}",
        "\\boxed{1}",
    ]
    answers = ["7", "7", "7", "7", code[4]]  # the last one: code in the gold answer of a data file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = reward(completions, answers)
    assert scores.tolist() == [0.0] * 5
    assert not any(m.exists() for m in markers)


def test_unparsable_gold_answer_is_reported(reward, caplog):
    with caplog.at_level(logging.WARNING, logger="mgrpo_pl.rewards.math"):
        assert reward(["\\boxed{1}", "\\boxed{2}"], ["\\text{}", "2"]).tolist() == [0.0, 1.0]
    assert "math-verify cannot parse the gold answer of 1 of 2 items, so they score 0" in caplog.text
    assert "first gold: '\\\\text{}'" in caplog.text
