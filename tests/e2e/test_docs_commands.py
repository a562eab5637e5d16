"""Every `mgrpo` command written in the README, the docs and the configs' headers parses as written, and the ones on
the tiny config run: a renamed flag or config fails here, not in a user's first hour."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mgrpo_pl.cli import cli_main, main

REPO = Path(__file__).resolve().parents[2]
SOURCES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "configs").rglob("*.yaml")),
    *sorted((REPO / "examples").rglob("*.md")),
    *sorted((REPO / "examples").rglob("*.yaml")),
]
COMMAND = re.compile(r"\bmgrpo (?:fit|validate|test)\b[^`#\n]*")
CD = re.compile(r"\bcd (\S+) && $")  # `cd examples/x && mgrpo ...`: the command runs in that folder


def documented_commands() -> dict[str, list[str]]:
    """``{"<file>:<line>": argv}`` for each ``mgrpo fit|validate|test`` command; ``\\``-continued lines are joined."""
    found = {}
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            for match in COMMAND.finditer(line):
                text, following = match.group(0).rstrip(), number
                while text.endswith("\\") and following < len(lines):
                    text = text[:-1] + " " + lines[following].split("#")[0].strip().lstrip("#").strip()
                    following += 1
                where = f"{path.relative_to(REPO)}:{number}"
                found[where] = shlex.split(text)[1:]
                folder = CD.search(line[: match.start()])
                if folder:
                    FOLDERS[where] = REPO / folder.group(1)
    return found


FOLDERS: dict[str, Path] = {}  # where a command is run from, when not the repository root
COMMANDS = documented_commands()


def test_the_docs_have_commands():
    # The extraction itself: the README's main command and its evaluation command are among them.
    argvs = [" ".join(a) for a in COMMANDS.values()]
    assert "fit --config configs/demo.yaml" in argvs
    assert any(a.startswith("test --config configs/demo.yaml --ckpt_path") for a in argvs)
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.fixture
def readme_rewards(tmp_path, monkeypatch):
    """The README's `my_rewards.py`, written out and importable, as its commands assume."""
    code = re.search(r"```python\n(# my_rewards\.py.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("where", list(COMMANDS))
def test_documented_command_parses(where, capsys, readme_rewards, monkeypatch):
    if where in FOLDERS:  # run there, with its modules importable, as `mgrpo` (main) makes them
        monkeypatch.chdir(FOLDERS[where])
        monkeypatch.syspath_prepend(str(FOLDERS[where]))
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*COMMANDS[where], "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


TINY = [
    w
    for w, argv in COMMANDS.items()
    if argv[:3] == ["fit", "--config", "configs/tiny.yaml"] and argv.count("--config") == 1
]


@pytest.mark.parametrize("where", TINY)
def test_documented_tiny_command_runs(where, tiny_model_path, tmp_path):
    argv = [a for a in COMMANDS[where] if a != "--print_config"]
    cli = cli_main(
        [*argv, f"--model.model={tiny_model_path}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"]
    )
    assert cli.trainer.global_step == 1


def test_the_readme_flow_runs_in_order_on_the_tiny_config(mgrpo_cache_dir, tmp_path, monkeypatch, capsys):
    """The README's main job, then its evaluation command on the checkpoint path it names, with configs/demo.yaml
    and runs/demo swapped for the tiny ones (install aside): both exit 0, in a fresh folder, as a user runs them."""
    readme = (REPO / "README.md").read_text()
    main_job = re.search(r"bash scripts/install\.sh && (mgrpo fit [^\n]*)", readme).group(1)
    evaluate = next(" ".join(["mgrpo", *a]) for a in COMMANDS.values() if a[:1] == ["test"] and "--ckpt_path" in a)
    assert main_job == "mgrpo fit --config configs/demo.yaml", main_job
    assert evaluate.endswith("--ckpt_path runs/demo/lightning_logs/version_0/checkpoints/last.ckpt"), evaluate
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.setenv("MGRPO_CACHE", str(mgrpo_cache_dir))  # the tiny model, built once per test session
    for command in (main_job, evaluate):
        argv = shlex.split(command.replace("demo", "tiny"))[1:]
        try:
            main(argv)
        except SystemExit as exit_info:
            pytest.fail(f"`{command}` exited with {exit_info.code}: {capsys.readouterr().err[-2000:]}")
    out = capsys.readouterr().out
    assert "test/arith_test" in out  # the evaluation's table row
    assert sorted(p.name for p in (tmp_path / "runs/tiny/lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_the_readme_reward_example_scores_as_it_says(readme_rewards):
    """The README's `LastIntegerReward` runs as written: 1.0 for the right last integer only."""
    from my_rewards import LastIntegerReward

    texts = ["2 + 3 = 5", "I think 4, not 5, so 4", "no number"]
    assert LastIntegerReward()(texts, ["5", "5", "5"]).tolist() == [1.0, 0.0, 0.0]


def test_the_mgrpo_script_finds_a_reward_module_in_the_working_directory(tmp_path):
    """`mgrpo` (the installed console script, whose sys.path starts with its bin folder) resolves the README's
    `--data.reward=my_rewards.LastIntegerReward` from the folder it is run in, as the README says."""
    import shutil
    import subprocess

    script = shutil.which("mgrpo")
    if script is None:
        pytest.skip("the mgrpo console script is not installed (pip install -e .)")
    code = re.search(r"```python\n(# my_rewards\.py.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "my_rewards.py").write_text(code)
    command = [script, "fit", "--config", str(REPO / "configs/demo.yaml"), "--data.reward=my_rewards.LastIntegerReward"]
    done = subprocess.run([*command, "--print_config"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: my_rewards.LastIntegerReward" in done.stdout
