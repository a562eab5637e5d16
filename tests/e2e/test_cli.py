"""The `mgrpo` command: every config parses, and a real tiny fit + test run writes what a user expects."""

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgrpo_pl.cli import cli_main

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("**/*.yaml"))


def _with_base(config: Path) -> list[str]:
    """Strategy overlays parse on top of the config they are written for (paper.yaml; tiny.yaml for CPU ones)."""
    if config.parent.name != "strategies":
        return ["--config", str(config)]
    base = CONFIG_DIR / ("tiny.yaml" if config.stem.endswith("_cpu") else "paper.yaml")
    return ["--config", str(base), "--config", str(config)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *_with_base(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_contradictory_flag_names_the_flag(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        cli_main(
            [
                "fit",
                "--config",
                "configs/tiny.yaml",
                f"--model.model={tiny_model_path}",
                f"--trainer.default_root_dir={tmp_path}",
                "--data.rollout.num_generations=1",
            ]
        )


@pytest.fixture(scope="module")
def fit_run(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    cli_main(
        [
            "fit",
            "--config",
            "configs/tiny.yaml",
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=3",
        ]
    )
    return root


def test_fit_writes_events_checkpoint_and_config(fit_run, capsys):
    version = fit_run / "lightning_logs" / "version_0"
    assert (version / "config.yaml").exists()
    checkpoints = list((version / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "a checkpoint should be written"
    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in [
        "train/loss_layer1",
        "train/loss_layer2",
        "train/kl",
        "train/clip_frac",
        "reward/layer1",
        "layer2/kept_queries",
        "tokens/generated",
        "time/generate_s",
        "time/train_s",
        "transitions/acc_t1",
        "transitions/acc_t2",
        "transitions/delta_i2c",
        "transitions/delta_c2i",
        "val/arith_val/acc_t1",
        "val/arith_val/delta_c2i",
    ]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert len(events.Scalars("train/loss_layer1")) == 3
    assert "completions/text_summary" in events.Tags()["tensors"]
    assert list(version.glob("val_arith_val_step3.jsonl"))


def test_test_command_reports_both_turns(fit_run, tiny_model_path, capsys):
    ckpt = next((fit_run / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    cli_main(
        [
            "test",
            "--config",
            "configs/tiny.yaml",
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={fit_run}",
            f"--ckpt_path={ckpt}",
        ]
    )
    out = capsys.readouterr().out
    assert "Acc@t1" in out and "test/arith_test" in out


def test_plot_script_draws_the_training_curves(fit_run, tmp_path):
    from scripts import plot_training

    out = tmp_path / "curves.png"
    drawn = plot_training.plot([str(fit_run / "lightning_logs" / "version_0")], ["tiny"], out, window=2)
    assert {"transitions/acc_t1", "transitions/acc_t2", "transitions/delta_i2c", "transitions/delta_c2i"} <= set(drawn)
    assert "val/arith_val/acc_t1" in drawn
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_test_from_a_checkpoint_generates_with_the_checkpoint_weights(fit_run, tiny_model_path, tmp_path):
    """`mgrpo test --ckpt_path` restores the weights after setup built the engine: an engine that keeps its own copy
    (as vLLM does) must receive them before the first test batch, or it would evaluate the untrained model."""
    import torch

    from callbacks.rollout import RolloutCallback, policy_weights
    from mgrpo_pl.rollout.engines import param_checksum

    ckpt = next((fit_run / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    overlay = tmp_path / "copy_engine.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.RolloutCallback\n      init_args: {share_weights: false}\n"
    )
    cli = cli_main(
        [
            "test",
            "--config",
            "configs/tiny.yaml",
            "--config",
            str(overlay),
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={ckpt}",
        ]
    )
    source = next(c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback))
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    names = [name for name, _ in policy_weights(cli.model)]  # parameters once each (a tied head is not repeated)
    trained_sum = param_checksum((name, trained[f"policy.{name}"]) for name in names)
    assert param_checksum(policy_weights(cli.model)) == trained_sum
    assert source.engine().weights_checksum() == trained_sum


def test_console_script_exits_with_status_0_after_a_fit(tiny_model_path, tmp_path):
    """The `mgrpo` script runs `sys.exit(<entry point>())`: a returned CLI object would mean exit status 1."""
    import re
    import subprocess
    import sys

    pyproject = (CONFIG_DIR.parent / "pyproject.toml").read_text()
    module, function = re.search(r'^mgrpo = "([\w.]+):(\w+)"$', pyproject, re.M).groups()
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    args = [
        "fit", "--config", "configs/tiny.yaml", f"--model.model={tiny_model_path}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=CONFIG_DIR.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
