"""`mgrpo` as a user meets it when something is wrong: one message naming the file, line or flag and the fix, exit
status 2, and the traceback only on request; checkpoints that are unreadable or disagree with the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mgrpo_pl.cli import main

REPO = Path(__file__).resolve().parents[2]


def _mgrpo(capsys, tiny_model_path, root, *flags, command="fit", config="configs/tiny.yaml"):
    """Run the console script's function; returns (exit status, stderr lines)."""
    capsys.readouterr()
    args = [command, "--config", str(REPO / config), f"--trainer.default_root_dir={root}", *flags]
    if tiny_model_path is not None:
        args.insert(3, f"--model.model={tiny_model_path}")
    try:
        main(args)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err.strip().splitlines()


def _errors(lines):
    return [line for line in lines if line.startswith("mgrpo: error:")]


def test_non_utf8_row_names_file_and_line(capsys, tiny_model_path, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "Caf\xe9: 2 + 2?", "answer": "4"}\n')
    status, err = _mgrpo(
        capsys, tiny_model_path, tmp_path, "--data.train.source=jsonl", f"--data.train.options={{path: {path}}}"
    )
    assert status == 2
    assert _errors(err) == [
        f"mgrpo: error: {path}, line 2: not UTF-8 (byte 0xe9); re-encode the file as UTF-8, e.g. "
        "`iconv -f latin1 -t utf-8` (--debug or MGRPO_DEBUG=1 shows the traceback)"
    ]
    assert not any("Traceback" in line for line in err)


def test_a_setting_error_is_one_line_and_debug_shows_the_traceback(capsys, tiny_model_path, tmp_path, monkeypatch):
    status, err = _mgrpo(capsys, tiny_model_path, tmp_path, "--data.rollout.num_generations=1")
    assert status == 2
    assert _errors(err) == [
        "mgrpo: error: --data.rollout.num_generations (G) must be >= 2 for group-relative advantages, got 1 "
        "(--debug or MGRPO_DEBUG=1 shows the traceback)"
    ]
    assert not any("Traceback" in line for line in err)
    monkeypatch.delenv("MGRPO_DEBUG", raising=False)
    with pytest.raises(ValueError, match="num_generations"):
        main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--data.rollout.num_generations=1", "--debug"])


@pytest.mark.parametrize(
    "where, wrong, right",
    [
        ("yaml", "bta", "model.loss.beta"),
        ("flag", "bta", "model.loss.beta"),
        ("flag", "num_corections", "data.rollout.num_corrections"),
    ],
)
def test_an_unknown_key_is_one_line_with_the_closest_valid_one(capsys, tmp_path, where, wrong, right):
    section = right.rpartition(".")[0]
    if where == "yaml":
        config = tmp_path / "typo.yaml"
        config.write_text((REPO / "configs/tiny.yaml").read_text().replace("  beta: 0.001", f"  {wrong}: 0.001"))
        status, err = _mgrpo(capsys, None, tmp_path, config=str(config))
        quoted = f"does not accept option '{section}.{wrong}'"
    else:
        status, err = _mgrpo(capsys, None, tmp_path, f"--{section}.{wrong}=1")
        quoted = f"unrecognized arguments: --{section}.{wrong}=1"
    assert status == 2
    assert len(err) == 1, err  # not the page of usage text
    assert quoted in err[0] and f"Did you mean '{right}'" in err[0] and "`mgrpo fit --help`" in err[0]


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """The last.ckpt of a 3-step tiny run (model.loss.beta 0.001)."""
    root = tmp_path_factory.mktemp("trained")
    args = ["fit", "--config", str(REPO / "configs/tiny.yaml"), f"--model.model={tiny_model_path}"]
    main([*args, f"--trainer.default_root_dir={root}", "--trainer.max_steps=3"])
    return root / "lightning_logs/version_0/checkpoints/last.ckpt"


def test_a_truncated_checkpoint_names_its_path(capsys, tiny_model_path, tmp_path, trained):
    half = tmp_path / "half.ckpt"
    half.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    status, err = _mgrpo(capsys, tiny_model_path, tmp_path, f"--ckpt_path={half}", command="test")
    assert status == 2
    assert len(_errors(err)) == 1 and _errors(err)[0].startswith(f"mgrpo: error: --ckpt_path {half}: cannot read")
    assert not (tmp_path / "lightning_logs").exists()  # refused before the trainer made a run folder


def test_a_missing_checkpoint_names_its_path(capsys, tiny_model_path, tmp_path):
    status, err = _mgrpo(capsys, tiny_model_path, tmp_path, f"--ckpt_path={tmp_path}/nope.ckpt", command="test")
    assert (status, _errors(err)[0].split(" (--debug")[0]) == (
        2,
        f"mgrpo: error: --ckpt_path {tmp_path}/nope.ckpt: no such file",
    )


def test_a_checkpoint_never_silently_replaces_the_model_flag(capsys, tiny_model_path, tmp_path, trained):
    status, err = _mgrpo(
        capsys, None, tmp_path, "--model.model=smollm2-135m-instruct", f"--ckpt_path={trained}", command="test"
    )
    assert status == 2
    assert _errors(err)[0].startswith(
        f"mgrpo: error: --ckpt_path {trained} holds weights of --model.model='{tiny_model_path}', but the config or "
        "flags say --model.model='smollm2-135m-instruct'"
    )


def test_other_flags_win_over_the_checkpoint_with_a_warning(tiny_model_path, tmp_path, trained, trainer_test_calls):
    from mgrpo_pl.cli import cli_main

    args = ["test", "--config", str(REPO / "configs/tiny.yaml"), f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={trained}"]  # fmt: skip
    with pytest.warns(
        UserWarning,
        match=r"the config or flags win over the checkpoint for model.loss.beta=0.5 \(the checkpoint has 0.001\)",
    ):
        cli = cli_main([*args, "--model.loss.beta=0.5"])
    assert cli.model.loss_settings.beta == 0.5
    # A setting left at its default takes the checkpoint's value (how `test --ckpt_path` rebuilds the trained model).
    saved = torch.load(trained, weights_only=True)
    saved["hyper_parameters"]["loss"]["clip_eps"] = 0.3
    torch.save(saved, tmp_path / "clip.ckpt")
    cli = cli_main([*args[:-1], f"--ckpt_path={tmp_path / 'clip.ckpt'}"])
    assert cli.model.loss_settings.clip_eps == 0.3 and json.dumps(cli.model.loss_settings.beta) == "0.001"


def test_a_checkpoint_with_flat_settings_is_read_into_groups(tiny_model_path, tmp_path, trained, trainer_test_calls):
    """Checkpoints written before the settings were grouped keep working: flat keys go to their groups."""
    from mgrpo_pl.cli import cli_main

    saved = torch.load(trained, weights_only=True)
    hparams = saved["hyper_parameters"]
    flat = {k: v for k, v in hparams.items() if k not in ("loss", "efficiency", "optim")}
    flat |= {**hparams["loss"], **hparams["efficiency"], **hparams["optim"]}
    flat["loss_aggregation"] = flat.pop("aggregation")
    # Settings configs/tiny.yaml leaves at their defaults, so the checkpoint's values apply.
    flat |= {"clip_eps_high": 0.3, "norm_length": 7, "memory_efficient_mlp": False, "min_lr_ratio": 0.2}
    saved["hyper_parameters"] = flat
    torch.save(saved, tmp_path / "flat.ckpt")
    args = ["test", "--config", str(REPO / "configs/tiny.yaml"), f"--model.model={tiny_model_path}"]
    cli = cli_main([*args, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={tmp_path / 'flat.ckpt'}"])
    loss, efficiency, optim = cli.model.loss_settings, cli.model.efficiency, cli.model.optim
    assert (loss.clip_eps_high, loss.norm_length, efficiency.memory_efficient_mlp, optim.min_lr_ratio) == (
        0.3,
        7,
        False,
        0.2,
    )


def test_help_says_what_mgrpo_is_and_lists_its_own_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "mgrpo: train language models to reason and to correct their own mistakes" in out
    assert "{fit,validate,test}" in out and "predict" not in out
    assert "Lightning Trainer command line tool" not in out
    listing = out[out.index("Available subcommands") :]
    assert "on the sets under data.test." in " ".join(listing.split())  # whole sentences, not cut docstrings


def test_a_run_stopped_by_bad_data_leaves_no_run_folder(capsys, tiny_model_path, tmp_path):
    # Found when the loaders are built, after the logger chose version_0: the folder goes, so the next run is version_0.
    path = tmp_path / "long.jsonl"
    long = {"question": "What is " + " + ".join(["1"] * 900) + "?", "answer": "900"}
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n" + json.dumps(long) + "\n")
    status, err = _mgrpo(
        capsys, tiny_model_path, tmp_path, "--data.train.source=jsonl", f"--data.train.options={{path: {path}}}"
    )
    assert status == 2 and "exceed the model's context" in _errors(err)[0]
    assert list((tmp_path / "lightning_logs").glob("version_*")) == []
