"""Preemption: SIGTERM (or SIGUSR1) mid-step finishes the step, saves a checkpoint, exits with 143, and the run
resumed from that checkpoint continues exactly like the uninterrupted one."""

import signal

import pytest
from resume_runs import TAGS, fit_args, scalars

from mgrpo_pl.cli import main

STEPS = 5


def _fit(tiny_model_path, root, *extra):
    """`mgrpo fit` through the console script's function; returns the exit status."""
    try:
        main(fit_args(tiny_model_path, root, STEPS, *extra))
    except SystemExit as exit_info:
        return exit_info.code
    return 0


@pytest.fixture(scope="module")
def full(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    assert _fit(tiny_model_path, root) == 0
    return scalars(root / "lightning_logs" / "version_0")


CASES = {
    "SIGTERM_mid_epoch": (signal.SIGTERM, 2),
    "SIGTERM_last_step_of_epoch": (signal.SIGTERM, 3),  # the checkpoint resumes with the next epoch
    "SIGUSR1": (signal.SIGUSR1, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_signal_saves_a_checkpoint_that_resumes_exactly(case, full, tiny_model_path, tmp_path):
    signum, step = CASES[case]
    sender = ["--trainer.callbacks+=plugin_callbacks.SignalAtStep", f"--trainer.callbacks.step={step}"]
    sender.append(f"--trainer.callbacks.signum={int(signum)}")
    assert _fit(tiny_model_path, tmp_path, *sender) == 143
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    stopped = scalars(tmp_path / "lightning_logs" / "version_0")
    assert sorted(stopped["reward/layer1"]) == list(range(step))  # the step signalled as it started was finished

    assert _fit(tiny_model_path, tmp_path, "--ckpt_path=hpc") == 0
    resumed = scalars(tmp_path / "lightning_logs" / "version_1")
    for tag in TAGS:
        assert sorted(resumed[tag]) == list(range(step, STEPS)), (tag, resumed[tag])
        for later in range(step, STEPS):
            assert resumed[tag][later] == pytest.approx(full[tag][later], rel=1e-6, abs=1e-9), (tag, later)
    # Steps that differ, or equal values would not show which step the resumed run replays.
    assert len(set(full["layer2/kept_queries"].values())) > 1, full


def test_the_handler_is_put_back(full):
    # After the runs above, SIGUSR1 is the process default again (a stray signal later kills, as it should).
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)
