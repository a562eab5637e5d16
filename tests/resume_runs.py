"""The short tiny-model fits that the resume and preemption tests compare step by step."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# What must be equal, step for step, between a resumed run and the uninterrupted one.
TAGS = ("train/loss_layer1", "train/loss_layer2", "reward/layer1", "layer2/kept_queries", "train/kl", "train/lr")


def fit_args(tiny_model_path, root, steps, *extra):
    """`mgrpo fit` flags: tiny config, parity reward (some probes verify), 3 steps an epoch, no validation."""
    return [
        "fit",
        "--config",
        "configs/tiny.yaml",
        f"--model.model={tiny_model_path}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        "--data.reward=plugin_rewards.ParityReward",
        "--data.rollout.layer2=true",
        # 6 problems / batch 2 = 3 steps per epoch: a resumed run crosses an epoch boundary.
        "--data.train.options={n: 6, seed: 0, max_value: 9}",
        "--trainer.limit_val_batches=0",
        *extra,
    ]


def scalars(run_dir):
    """``{tag: {step: value}}`` of the TAGS logged in one run folder (``lightning_logs/version_N``)."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in TAGS}
