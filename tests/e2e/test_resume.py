"""Kill-and-resume: a run resumed from step k's checkpoint continues exactly like the uninterrupted run."""

import pytest
from resume_runs import TAGS, fit_args, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgrpo_pl.cli import cli_main
from mgrpo_pl.data.resumable import EpochSampler, ResumableLoader

# Validation on every step, drawing its turn-2 phrases from the pool (eval_guide null): the path that drew from
# training's guide generator, and whose loaders' iterators drew from the global RNG, before evaluation had its own.
VALIDATE_EVERY_STEP = [
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=1",
    "--data.rollout.eval_guide=null",
]


def _run(tiny_model_path, root, steps, ckpt=None, extra=()):
    checkpoint_every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    resume = [f"--ckpt_path={ckpt}", "--weights_only=true"] if ckpt else []
    cli_main(fit_args(tiny_model_path, root, steps, *extra, *checkpoint_every_step, *resume))


def _scalars(root):
    return scalars(root / "lightning_logs" / "version_0")


@pytest.fixture(scope="module")
def runs(tiny_model_path, tmp_path_factory):
    full, resumed = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("resumed")
    _run(tiny_model_path, full, steps=5)
    ckpt = full / "lightning_logs" / "version_0" / "checkpoints" / "step=2.ckpt"
    assert ckpt.exists(), list(ckpt.parent.iterdir())
    _run(tiny_model_path, resumed, steps=5, ckpt=ckpt)
    return _scalars(full), _scalars(resumed)


def test_resumed_steps_equal_the_uninterrupted_run(runs):
    full, resumed = runs
    for tag in TAGS:
        steps = sorted(full[tag])
        assert len(steps) == 5, (tag, full[tag])
        assert sorted(resumed[tag]) == steps[2:], (tag, resumed[tag])  # the resumed run logs steps 3..5 only
        for step in steps[2:]:
            assert resumed[tag][step] == pytest.approx(full[tag][step], rel=1e-6, abs=1e-9), (tag, step)
    # The steps must differ, or equal values would prove nothing about which step a resumed run replays.
    assert len(set(full["layer2/kept_queries"].values())) > 1, full


@pytest.fixture(scope="module")
def validating_runs(tiny_model_path, tmp_path_factory):
    full, resumed = tmp_path_factory.mktemp("validating"), tmp_path_factory.mktemp("validating_resumed")
    _run(tiny_model_path, full, steps=5, extra=VALIDATE_EVERY_STEP)
    # step=2.ckpt is written at the end of step 2's training batch; step 2's validation runs after it
    ckpt = full / "lightning_logs" / "version_0" / "checkpoints" / "step=2.ckpt"
    _run(tiny_model_path, resumed, steps=5, ckpt=ckpt, extra=VALIDATE_EVERY_STEP)
    events = EventAccumulator(str(full / "lightning_logs" / "version_0"))
    events.Reload()
    validated = [tag for tag in events.Tags()["scalars"] if tag.startswith("val")]
    assert validated and len(events.Scalars(validated[0])) == 5, validated  # validation really ran at every step
    return _scalars(full), _scalars(resumed)


def test_validation_changes_no_training_rollout(runs, validating_runs):
    plain, _ = runs
    validating, _ = validating_runs
    for tag in TAGS:
        assert validating[tag] == pytest.approx(plain[tag], rel=1e-6, abs=1e-9), tag


def test_resume_after_a_validated_step_is_exact(validating_runs):
    full, resumed = validating_runs
    for tag in TAGS:
        for step in sorted(full[tag])[2:]:
            assert resumed[tag][step] == pytest.approx(full[tag][step], rel=1e-6, abs=1e-9), (tag, step)


def test_sampler_order_is_fixed_by_seed_and_epoch():
    a, b = EpochSampler(10, True, seed=3), EpochSampler(10, True, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert sorted(a) == list(range(10)) and list(a) != first


def test_loader_state_skips_used_batches_once():
    loader = ResumableLoader(list(range(10)), batch_size=3, shuffle=False, seed=0, collate_fn=list)
    loader.mark_used()
    loader.mark_used()
    state = loader.state_dict()
    assert state == {"epoch": 0, "used_in_epoch": 2}
    fresh = ResumableLoader(list(range(10)), batch_size=3, shuffle=False, seed=0, collate_fn=list)
    fresh.load_state_dict(state)
    assert list(fresh) == [[6, 7, 8], [9]]
    assert list(fresh)[0] == [0, 1, 2]  # the next epoch starts from the beginning


def test_a_checkpoint_from_an_epochs_last_batch_resumes_with_the_whole_next_epoch():
    # Lightning moves on to the next epoch (set_epoch) before it iterates when the saved epoch had no batch left.
    fresh = ResumableLoader(list(range(6)), batch_size=2, shuffle=False, seed=0, collate_fn=list)
    fresh.load_state_dict({"epoch": 0, "used_in_epoch": 3})
    fresh.epoch_sampler.set_epoch(1)
    assert list(fresh) == [[0, 1], [2, 3], [4, 5]]
