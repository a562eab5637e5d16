"""Nothing lost: every bad input gets an error naming its file and line or its flag, and degenerate data stays finite.
Most cases go through ``mgrpo`` itself (``cli_main``), as a user would meet them; the safe defaults (no remote code,
weights-only checkpoints, model text never run) are in ``test_safe_defaults.py``.

Cases tested elsewhere, not repeated here:

- dataset loaders, row by row (missing file, empty or blank file, invalid JSON, a missing field naming the fields the
  row has, GSM8K answer without ``####``, no ``\\boxed{}``, empty answer, wrong types, duplicate ids, skipped rows
  counted in a ``SkipReport`` and a warning, a file with no usable row): ``tests/unit/test_problems.py``;
- G < 2 through the CLI: ``test_cli.py::test_contradictory_flag_names_the_flag``;
- ``--model.loss.beta`` < 0, ``--model.temperature`` 0 and ``--model.loss.tis_cap`` < 1 in the constructor:
  ``test_module_loss.py::test_constructor_errors_name_the_flag`` and ``::test_tis_cap_below_one_names_the_flag``;
- a training problem or a layer-2 query longer than the context:
  ``test_pipeline.py::test_prompt_longer_than_the_context_names_problem_and_flag`` and
  ``::test_layer2_query_longer_than_the_context_is_refused``;
- ``policy_loss`` with beta > 0 and no reference log-probs: ``test_losses.py::test_beta_without_reference_raises``;
- a non-finite loss stops the run before the optimizer step:
  ``test_training.py::test_non_finite_loss_stops_before_the_optimizer_step``; a non-finite reward:
  ``test_training.py::test_non_finite_reward_is_refused``;
- G' = 0 in a real run (no probe verified): ``test_training.py::test_no_verified_probe_trains_layer1_only``;
- adversarial completions that would hang the reward (huge powers, factorials, a million characters):
  ``test_rewards.py::test_adversarial_returns_in_time``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from mgrpo_pl.algo.advantages import group_advantages
from mgrpo_pl.algo.losses import LossAggregation
from mgrpo_pl.cli import cli_main
from mgrpo_pl.data.loaders import DatasetError
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.rollout.types import RolloutBatch
from mgrpo_pl.settings import LossSettings

REPO = Path(__file__).resolve().parents[2]
MODES = [m.value for m in LossAggregation]


def _mgrpo(tiny_model_path, root, *flags, command="fit"):
    """``mgrpo <command> --config configs/tiny.yaml`` on the session's tiny model, writing under ``root``."""
    return cli_main(
        [
            command,
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={root}",
            *flags,
        ]
    )


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- dataset files, through `mgrpo fit` ---------------------------------------------------------------------------

GOOD = {"question": "What is 1 + 1?", "answer": "2"}

BAD_FILES = {
    "missing_answer": (
        [GOOD, {"question": "What is 2 + 2?"}],
        {},
        "train.jsonl, line 2, field 'answer': missing field 'answer'; the row has fields ['question']",
    ),
    "unparsable_answer": (
        [{"question": "q", "answer": "2\n#### 2"}, {"question": "What is 2 + 2?", "answer": "four"}],
        {"answer_format": "gsm8k"},
        "train.jsonl, line 2, field 'answer': no '#### <answer>' marker in 'four' (answer_format='gsm8k')",
    ),
    "empty_file": ([], {}, "train.jsonl: the file is empty"),
    "wrong_field_names": (
        [{"problem": "What is 1 + 1?", "solution": "2"}],
        {},
        "train.jsonl, line 1, field 'question': missing field 'question'; the row has fields ['problem', 'solution']",
    ),
    "invalid_json": ([GOOD, '{"question": "What is 2 + 2?", "answer": '], {}, "train.jsonl, line 2: invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_dataset_file_names_file_line_and_field(case, tiny_model_path, tmp_path):
    rows, options, message = BAD_FILES[case]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    options = json.dumps({"path": str(path), **options})
    with pytest.raises(DatasetError, match=re.escape(message)):
        _mgrpo(tiny_model_path, tmp_path, "--data.train.source=jsonl", f"--data.train.options={options}")


def test_skipped_rows_are_counted_and_logged(tiny_model_path, tmp_path, caplog):
    rows = [GOOD, {"question": "What is 2 + 2?"}, GOOD | {"question": "What is 3 + 3?"}, "{not json"]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    options = json.dumps({"path": str(path), "on_error": "skip"})
    with caplog.at_level(logging.WARNING, logger="mgrpo_pl.data.problems"):
        flags = ["--data.train.source=jsonl", f"--data.train.options={options}", "--trainer.max_steps=0"]
        flags.append("--trainer.limit_val_batches=0")  # 2 problems: fewer batches than tiny.yaml's val interval
        cli = _mgrpo(tiny_model_path, tmp_path, *flags)
    assert len(cli.datamodule._problems["train"][0]) == 2
    assert "2 row(s) skipped" in caplog.text
    assert "train.jsonl, line 2, field 'answer': missing field 'answer'" in caplog.text
    assert "train.jsonl, line 4: invalid JSON" in caplog.text


LONG_QUESTION = "What is " + " + ".join(["1"] * 900) + "?"  # ~2700 tokens; the tiny model's context is 2048


def _has_trained(root: Path) -> bool:
    return any("reward/layer1" in f.read_bytes().decode("latin1") for f in root.rglob("events.out.tfevents.*"))


def test_eval_prompt_longer_than_the_context_names_problem_and_flag(tiny_model_path, tmp_path):
    path = _jsonl(tmp_path / "long.jsonl", [GOOD, {"question": LONG_QUESTION, "answer": "900"}])
    message = (
        r"long\.jsonl, line 2: problem 'long:2': \d+ prompt tokens \+ \d+ for "
        r"--data.rollout.eval_sampling.max_new_tokens x 2 turns and their guide phrases exceed the model's context "
        r"of 2048 tokens"
    )
    with pytest.raises(DatasetError, match=message):
        _mgrpo(
            tiny_model_path,
            tmp_path,
            f"--data.val=[{{source: jsonl, name: long, options: {{path: {path}}}}}]",
            command="validate",
        )


def test_training_prompt_longer_than_the_context_stops_before_the_first_step(tiny_model_path, tmp_path):
    rows = [GOOD] * 3 + [{"question": LONG_QUESTION, "answer": "900"}] + [GOOD] * 2
    path = _jsonl(tmp_path / "train.jsonl", rows)
    message = (
        r"train\.jsonl, line 4: problem 'train:4': \d+ prompt tokens \+ \d+ for --data.rollout.sampling.max_new_tokens "
        r"and, for each of the 1 correction layer\(s\) \(--data.rollout.num_layers\), its guide phrase"
    )
    with pytest.raises(DatasetError, match=message + ".*add `on_error: skip` to the set's options"):
        _mgrpo(tiny_model_path, tmp_path, "--data.train.source=jsonl", f"--data.train.options={{path: {path}}}")
    assert not _has_trained(tmp_path)  # found when the loaders were built, not at the step that drew it


def test_on_error_skip_drops_prompts_longer_than_the_context(tiny_model_path, tmp_path, caplog):
    rows = [GOOD] * 3 + [{"question": LONG_QUESTION, "answer": "900"}] + [GOOD] * 2
    path = _jsonl(tmp_path / "train.jsonl", rows)
    options = json.dumps({"path": str(path), "on_error": "skip"})
    flags = ["--data.train.source=jsonl", f"--data.train.options={options}", "--trainer.max_steps=1"]
    with caplog.at_level(logging.WARNING, logger="mgrpo_pl.data.context"):
        cli = _mgrpo(tiny_model_path, tmp_path, *flags, "--trainer.limit_val_batches=0")
    assert [p.id for p in cli.datamodule._problems["train"][0]] == [
        "train:1",
        "train:2",
        "train:3",
        "train:5",
        "train:6",
    ]
    assert "1 problem(s) longer than the context skipped: " in caplog.text
    assert "train.jsonl, line 4: problem 'train:4'" in caplog.text
    assert _has_trained(tmp_path)


# -- contradictory or out-of-range settings, through `mgrpo fit` --------------------------------------------------

BAD_FLAGS = {
    "H_below_1": (["--data.rollout.num_corrections=0"], "--data.rollout.num_corrections (H) must be >= 1, got 0"),
    "empty_guide_pool": (
        ["--data.rollout.guide_phrases=[]"],
        "--data.rollout.guide_phrases is empty but layer 2 is on: give at least one phrase",
    ),
    "empty_guide_pool_layer2_off": (
        ["--data.rollout.layer2=false", "--data.rollout.guide_phrases=[]", "--data.rollout.eval_guide=null"],
        "--data.rollout.guide_phrases is empty and --data.rollout.eval_guide is not set",
    ),
    "correction_temperature_differs": (
        ["--data.rollout.correction_sampling={temperature: 0.5}"],
        "--data.rollout.correction_sampling.temperature=0.5 differs from --data.rollout.sampling.temperature=1.0",
    ),
    "blank_guide_phrase": (
        ["--data.rollout.guide_phrases=[Check your answer., '  ']"],
        "--data.rollout.guide_phrases has blank phrases at positions [1]",
    ),
    "blank_eval_guide": (
        ["--data.rollout.eval_guide=  "],
        "--data.rollout.eval_guide is blank: give the turn-2 phrase, or null to use the pool",
    ),
    "unknown_loss_aggregation": (
        ["--model.loss.aggregation=sum"],
        "--model.loss.aggregation 'sum' is unknown; choose from seq-mean-token-mean, token-mean, "
        "seq-mean-token-sum-norm",
    ),
    "unknown_data_option": (
        ["--data.train.options={n: 8, max_vlaue: 9}"],
        "problem source 'arithmetic' has no option(s) ['max_vlaue']; its options are ['allow_negative', 'max_value'",
    ),
    "missing_data_path": (
        ["--data.train.source=jsonl", "--data.train.options={}"],
        "problem source 'jsonl' needs the option(s) ['path'] in its options",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_setting_names_the_flag(case, tiny_model_path, tmp_path):
    flags, message = BAD_FLAGS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        _mgrpo(tiny_model_path, tmp_path, *flags, "--trainer.max_steps=0")


ZERO_VARIANCE = {
    "temperature_0": (
        ["--data.rollout.sampling.temperature=0"],
        "--data.rollout.sampling.temperature is 0 with G > 1: every group's samples are identical",
    ),
    "H_equal_1": (["--data.rollout.num_corrections=1"], "--data.rollout.num_corrections (H) is 1"),
}


@pytest.mark.parametrize("case", list(ZERO_VARIANCE))
def test_zero_variance_groups_warn(case, tiny_model_path, tmp_path):
    flags, message = ZERO_VARIANCE[case]
    with pytest.warns(UserWarning, match=re.escape(message)):
        _mgrpo(tiny_model_path, tmp_path, *flags, "--trainer.max_steps=0")


def test_empty_guide_pool_is_fine_when_nothing_draws_from_it(tiny_model_path, tmp_path):
    flags = ["--data.rollout.layer2=false", "--data.rollout.guide_phrases=[]", "--data.rollout.eval_guide=Check."]
    flags.append("--data.reward=plugin_rewards.ParityReward")
    cli = _mgrpo(tiny_model_path, tmp_path, *flags, command="validate")
    assert "val/arith_val/acc_t2" in cli.trainer.callback_metrics


# -- beta > 0 without a reference ---------------------------------------------------------------------------------


def _batch(comp_lens, layers, advantages, truncated=None, prompt_len=5, vocab=200, seed=0):
    """A RolloutBatch of random tokens: one prompt length, the given completion lengths, layers and advantages."""
    g = torch.Generator().manual_seed(seed)
    n = len(comp_lens)
    layer = torch.tensor(layers)
    n1 = int((layer == 1).sum())
    return RolloutBatch(
        sequences=[torch.randint(3, vocab, (prompt_len + c,), generator=g) for c in comp_lens],
        prompt_lengths=torch.full((n,), prompt_len),
        advantages=torch.as_tensor(advantages, dtype=torch.float32),
        layer=layer,
        truncated=torch.zeros(n, dtype=torch.bool) if truncated is None else torch.tensor(truncated),
        rewards=torch.zeros(n),
        num_problems=2,
        correct_t1=torch.zeros(n1, dtype=torch.bool),
        correct_t2=torch.zeros(n1 if (layer == 2).any() else 0, dtype=torch.bool),
    )


def test_beta_without_a_loaded_reference_names_the_flag(tiny_model_path):
    module = MGRPOModule(model=str(tiny_model_path), loss=LossSettings(beta=0.0))
    module.configure_model()
    assert module.reference is None  # beta = 0 never loads it
    module.loss_settings.beta = (
        0.01  # a setting changed after setup: the module must not train without the KL it asks for
    )
    with pytest.raises(ValueError, match=re.escape("--model.loss.beta=0.01 > 0 needs the frozen reference model")):
        module.backward_batch(_batch([3, 4, 2, 5], [1] * 4, [1.0, -1.0, 0.5, -0.5]))


# -- degenerate data: finite loss, finite gradients -----------------------------------------------------------------


@pytest.fixture(scope="module")
def module(tiny_model_path):
    m = MGRPOModule(model=str(tiny_model_path), loss=LossSettings(beta=0.1))
    m.configure_model()
    with torch.no_grad():  # policy != reference, so the KL term is live
        for p in m.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _backward(module, batch, mode, mask_truncated=False):
    """Run ``backward_batch``; return the total loss and whether every gradient is finite."""
    module.loss_settings.aggregation = mode
    module.loss_settings.mask_truncated = mask_truncated
    module.efficiency.micro_batch_tokens = 24  # several micro-batches
    module.policy.zero_grad()
    try:
        sums, _ = module.backward_batch(batch)
    finally:
        module.loss_settings.mask_truncated = False
    loss = sums["loss/layer1"] + module.loss_settings.layer2_weight * sums["loss/layer2"]
    grads = [p.grad for p in module.policy.parameters()]
    assert all(g is not None for g in grads)
    return loss, sums, all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("mode", MODES)
def test_all_correct_and_all_wrong_groups(module, mode):
    # Layer 1: problem 0 all right, problem 1 all wrong (G = 4); layer 2: one all-right group (H = 2).
    adv1 = group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])).flatten()
    adv2 = group_advantages(torch.tensor([[1.0, 1.0]])).flatten()
    assert adv1.eq(0).all() and adv2.eq(0).all()  # zero-variance groups: exactly 0, not 0/0
    batch = _batch([3, 5, 1, 4, 6, 2, 3, 7, 4, 4], [1] * 8 + [2] * 2, torch.cat([adv1, adv2]))
    loss, sums, finite = _backward(module, batch, mode)
    assert math.isfinite(loss) and finite
    assert sums["kl_mean"] > 0  # the KL still trains


@pytest.mark.parametrize("mode", MODES)
def test_empty_completions(module, mode):
    some_empty = _batch([0, 4, 0, 3], [1, 1, 1, 1], [1.0, -1.0, 0.5, -0.5])
    loss, sums, finite = _backward(module, some_empty, mode)
    assert math.isfinite(loss) and finite and sums["tokens"] == 7
    all_empty = _batch([0, 0, 0, 0], [1, 1, 2, 2], [1.0, -1.0, 1.0, -1.0])
    loss, sums, finite = _backward(module, all_empty, mode)
    assert loss == 0.0 and finite and sums["tokens"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_truncated_completions_masked_from_the_loss(module, mode):
    batch = _batch([4, 6, 5, 6], [1, 1, 2, 2], [1.0, -1.0, 1.0, -1.0], truncated=[False, True, False, True])
    loss, sums, finite = _backward(module, batch, mode, mask_truncated=True)
    assert math.isfinite(loss) and finite and sums["tokens"] == 4 + 5
    # Every completion cut at the limit (a random model that never stops): nothing trains, nothing breaks.
    batch = _batch([6, 6, 6, 6], [1, 1, 2, 2], [1.0, -1.0, 1.0, -1.0], truncated=[True] * 4)
    loss, sums, finite = _backward(module, batch, mode, mask_truncated=True)
    assert loss == 0.0 and finite and sums["tokens"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_no_layer2_rows_in_the_batch(module, mode):
    batch = _batch([3, 5, 2, 4], [1, 1, 1, 1], group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).flatten())
    loss, sums, finite = _backward(module, batch, mode)
    assert math.isfinite(loss) and finite and sums["loss/layer2"] == 0.0


def test_every_completion_truncated_in_a_real_run(tiny_model_path, tmp_path):
    # The random tiny model never emits an end token in 16 tokens, so with mask_truncated no token is trained.
    cli = _mgrpo(
        tiny_model_path,
        tmp_path,
        "--model.loss.mask_truncated=true",
        "--data.reward=plugin_rewards.ParityReward",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1
    assert float(metrics["rollout/truncated_frac"]) == 1.0 and float(metrics["train/trained_tokens"]) == 0.0
    assert float(metrics["train/loss"]) == 0.0 and math.isfinite(float(metrics["train/grad_norm"]))


def test_non_finite_gradient_stops_before_the_weights_move(module):
    batch = _batch([3, 5, 2, 4], [1, 1, 1, 1], [1.0, -1.0, 0.5, -0.5])
    _backward(module, batch, "seq-mean-token-mean")
    first = next(module.policy.parameters())
    first.grad[0] = float("inf")  # a finite loss whose backward overflowed
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm inf at global step 0; the weights were not"):
        module._step_optimizer(optimizer)
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
