"""Strategies on 2 CPU processes (gloo): DDP and FSDP2 reproduce the single-process run of the same global batch.

The multi-process runs go through the real `mgrpo fit` command in a subprocess: Lightning's DDP and
ModelParallelStrategy launchers re-run that command for rank 1, which a pytest process cannot be. Rollouts use
``seed_per_problem`` so every problem gets the same samples on whichever rank it lands, and the parity reward so
that layer-2 groups exist. Then the logged values (rank 0's logger, after the cross-rank reductions) must equal the
single-process run's: rollout metrics exactly, losses, KL and gradient norms within float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgrpo_pl.cli import cli_main
from mgrpo_pl.data.loaders import Problem
from mgrpo_pl.data.resumable import EpochSampler
from mgrpo_pl.method import MGRPORollout
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import TransformersEngine
from mgrpo_pl.rollout.types import SamplingConfig
from mgrpo_pl.strategies import gpu_requirement
from plugin_rewards import ParityReward

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3

# Every value that depends only on the rollouts: must be equal, not close.
EXACT = [
    "reward/layer1",
    "reward/layer2",
    "layer2/kept_queries",
    "layer2/verified_queries",
    "layer2/probe_accuracy",
    "tokens/generated",
    "train/trained_tokens",
    "transitions/acc_t1",
    "transitions/acc_t2",
    "transitions/delta_i2c",
    "transitions/delta_c2i",
]


def _mgrpo_fit(root: Path, model: Path, *flags: str, timeout: float = 420) -> dict[str, list[float]]:
    """`mgrpo fit` on configs/tiny.yaml in a subprocess; returns rank 0's logged scalars per step."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), TOKENIZERS_PARALLELISM="0")
    args = [
        sys.executable,
        "-m",
        "mgrpo_pl",
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        *flags,
        f"--model.model={model}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={STEPS}",
        "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",
        "--data.reward=plugin_rewards.ParityReward",
        "--data.rollout.seed_per_problem=true",
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"))
    events.Reload()
    return {tag: [s.value for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same_run(got: dict[str, list[float]], want: dict[str, list[float]]) -> None:
    for tag in EXACT:
        assert got[tag] == want[tag], tag
    assert len(got["train/loss"]) == STEPS
    # Gradient norms are the sharpest check of the global normalisers and the gradient-averaging scale.
    assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-4)
    assert got["train/kl"] == pytest.approx(want["train/kl"], rel=1e-4, abs=1e-9)
    # GRPO losses nearly cancel (advantages sum to 0 per group), so they are small: compare absolutely.
    for tag in ("train/loss", "train/loss_layer1", "train/loss_layer2"):
        assert got[tag] == pytest.approx(want[tag], abs=5e-8), tag
    assert max(abs(v) for v in want["train/loss_layer2"]) > 1e-6, "layer 2 should be trained"


@pytest.fixture(scope="module")
def single(tiny_model_path, tmp_path_factory):
    """One process, 4 problems per step: the reference trajectory."""
    return _mgrpo_fit(tmp_path_factory.mktemp("single"), tiny_model_path, "--data.batch_size=4")


def test_ddp_matches_single_process(single, tiny_model_path, tmp_path):
    got = _mgrpo_fit(
        tmp_path,
        tiny_model_path,
        "--config",
        str(ROOT / "configs" / "strategies" / "ddp_cpu.yaml"),  # 2 processes x 2 problems
    )
    _assert_same_run(got, single)


def test_fsdp2_matches_single_process(single, tiny_model_path, tmp_path):
    # By default under FSDP2 the engine keeps its own whole copy, refreshed from the sharded policy with
    # full_tensor() every step (RolloutCallback's share_weights=None).
    got = _mgrpo_fit(
        tmp_path,
        tiny_model_path,
        "--config",
        str(ROOT / "configs" / "strategies" / "ddp_cpu.yaml"),
        "--trainer.strategy=fsdp2",
    )
    _assert_same_run(got, single)


THREE_LAYERS = [
    "--data.rollout.num_layers=3",
    "--data.rollout.layer_overrides={3: {num_corrections: 3}}",
    "--model.loss.layer_weights={3: 0.5}",
]


def test_ddp_matches_single_process_with_three_layers(tiny_model_path, tmp_path):
    """Layer-3 counts, statistics and losses are reduced over ranks like layer 2's, whichever rank kept what."""
    want = _mgrpo_fit(tmp_path / "single", tiny_model_path, "--data.batch_size=4", *THREE_LAYERS)
    ddp = str(ROOT / "configs" / "strategies" / "ddp_cpu.yaml")
    got = _mgrpo_fit(tmp_path / "ddp", tiny_model_path, "--config", ddp, *THREE_LAYERS)
    _assert_same_run(got, want)
    for tag in ("reward/layer3", "layer3/kept_queries", "layer3/probe_accuracy", "tokens/probe3", "tokens/layer3"):
        assert got[tag] == want[tag], tag
    assert got["train/loss_layer3"] == pytest.approx(want["train/loss_layer3"], abs=5e-8)
    assert max(abs(v) for v in want["train/loss_layer3"]) > 1e-6, "layer 3 should be trained"


LORA = ["--model.lora.r=4", "--model.lora.alpha=8", "--model.optimizer.init_args.lr=5.0e-2"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lora_matches_single_process(tiny_model_path, tmp_path, strategy):
    """Only the adapters train and are all-reduced (DDP) or sharded (FSDP2); the reference is the base with the
    adapters off on every rank; the engine gets the merged weights."""
    want = _mgrpo_fit(tmp_path / "single", tiny_model_path, "--data.batch_size=4", *LORA)
    ddp = str(ROOT / "configs" / "strategies" / "ddp_cpu.yaml")
    extra = ["--trainer.strategy=fsdp2"] if strategy == "fsdp2" else []
    got = _mgrpo_fit(tmp_path / strategy, tiny_model_path, "--config", ddp, *extra, *LORA)
    _assert_same_run(got, want)
    assert max(want["train/grad_norm"]) > 0


@pytest.fixture()
def early_ending_model(tiny_model_path, tmp_path):
    """The tiny model with 100 extra end-of-turn ids, so completions end early at random (different lengths)."""
    folder = tmp_path / "early_end"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [int(config["eos_token_id"]), *range(300, 400)]
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_fsdp2_shared_engine_does_not_deadlock_on_different_lengths(early_ending_model, tmp_path):
    """Generation with the sharded policy itself: per-rank lengths, prompt counts and chunk counts all differ."""
    overlay = tmp_path / "shared_engine.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.RolloutCallback\n      init_args: {share_weights: true}\n"
    )
    got = _mgrpo_fit(
        tmp_path,
        early_ending_model,
        "--config",
        str(ROOT / "configs" / "strategies" / "ddp_cpu.yaml"),
        "--config",
        str(overlay),
        "--trainer.strategy=fsdp2",
        "--data.rollout.seed_per_problem=false",  # one engine call per batch: chunk counts follow each rank's K
        timeout=300,
    )
    assert len(got["train/loss"]) == STEPS
    truncated = got["rollout/truncated_frac"]
    assert all(0.0 < t < 1.0 for t in truncated), f"lengths should vary: truncated fractions {truncated}"


def test_sampler_shards_give_the_single_process_batches():
    single = list(EpochSampler(10, shuffle=True, seed=3, batch_size=4))
    ranks = [list(EpochSampler(10, shuffle=True, seed=3, batch_size=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 10 padded to 12 = 3 global batches of 2 x 2
    for step in range(2):  # the full global batches are exactly the single-process batches
        global_batch = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert global_batch == single[4 * step : 4 * step + 4]
    assert set(ranks[0] + ranks[1]) == set(range(10))  # the last global batch wraps around to fill up
    assert EpochSampler(10, shuffle=False, seed=0, batch_size=4).shard() == list(range(10))  # one rank: no padding


def test_seed_per_problem_gives_a_problem_the_same_rollout_in_any_batch(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = RolloutConfig(
        num_generations=3, num_corrections=2, seed_per_problem=True, sampling=SamplingConfig(max_new_tokens=6)
    )
    pipeline = MGRPORollout(config, tokenizer, ParityReward())
    engine = TransformersEngine(model, tokenizer)
    problems = [Problem(id=f"p{i}", question=f"{i} + {i} = ?", answer=str(2 * i)) for i in range(4)]
    together = pipeline.rollout(engine, problems, step=5)
    halves = [pipeline.rollout(engine, problems[:2], step=5), pipeline.rollout(engine, problems[2:], step=5)]
    layer1 = [s.tolist() for s, layer in zip(together.sequences, together.layer) if layer == 1]
    split = [s.tolist() for half in halves for s, layer in zip(half.sequences, half.layer) if layer == 1]
    assert layer1 == split
    assert together.correct_t2.tolist() == halves[0].correct_t2.tolist() + halves[1].correct_t2.tolist()
    other_step = pipeline.rollout(engine, problems, step=6)
    assert [s.tolist() for s in other_step.sequences[: len(layer1)]] != layer1  # the seed moves with the step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
@pytest.mark.parametrize(
    "flags",
    [
        ["--trainer.strategy=fsdp"],
        ["--trainer.strategy=deepspeed"],
        ["--config", "configs/strategies/fsdp.yaml"],
        ["--config", "configs/strategies/deepspeed_zero3.yaml"],
    ],
    ids=["fsdp", "deepspeed", "fsdp.yaml", "deepspeed_zero3.yaml"],
)
def test_gpu_only_strategies_stop_with_a_message(flags, tiny_model_path, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", "--config", "configs/tiny.yaml", *flags, "--trainer.accelerator=cpu"]
            + [f"--model.model={tiny_model_path}", f"--trainer.default_root_dir={tmp_path}"]
        )
    message = str(exit_info.value.code)
    assert message.startswith("error: --trainer.strategy=") and "needs a GPU" in message
    assert "\n" not in message


def test_gpu_requirement_names_the_flag():
    assert gpu_requirement("ddp", "cpu") is None
    assert gpu_requirement("fsdp2", "cpu") is None
    assert gpu_requirement("fsdp", "cpu") == "--trainer.strategy=fsdp"
    assert gpu_requirement("deepspeed_stage_3", "auto") == "--trainer.strategy=deepspeed_stage_3"
    assert gpu_requirement("auto", "gpu") == "--trainer.accelerator=gpu"
