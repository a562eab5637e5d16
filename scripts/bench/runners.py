"""The two sides of ``scripts/bench/trl.py``: one timed run of mgrpo_pl or of TRL's GRPOTrainer, in this process.

``bench_trl.py`` starts each run in its own subprocess (``--only grpo|trl|mgrpo``) so that peak RSS is per framework;
see its docstring for what "the same work" means and what differs unavoidably. TRL is imported only inside
``run_trl``: mgrpo_pl itself never needs it.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

INSTRUCTION = "Put the answer in \\boxed{}."
BENCH_MODEL = "qwen2-30m"
# Shape of the default benchmark model: ~30M parameters with the project's byte-level BPE tokenizer (vocab 1024).
QWEN2_30M = {
    "hidden_size": 512,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
}
# A GPU-sized model: Qwen2.5-0.5B's layer shapes (24 layers, grouped KV heads) with the same small vocabulary, ~360M
# parameters. Random weights never emit the end token, so every completion runs to the length limit on both sides.
QWEN2_360M = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
BENCH_SHAPES = {BENCH_MODEL: QWEN2_30M, "qwen2-360m": QWEN2_360M}


# -- the model both frameworks load -------------------------------------------------------------------------------
def _build_qwen2(folder: Path, shape: dict[str, int]) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from mgrpo_pl.modeling.tiny import EOS_TOKEN, PAD_TOKEN, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def prepare_model(name: str, cache_dir: str | None) -> str:
    """The folder both frameworks load: built once into the cache (a ``BENCH_SHAPES`` Qwen2), or a name mgrpo_pl
    resolves."""
    from functools import partial

    from mgrpo_pl.modeling import default_cache_dir, resolve_model_path
    from mgrpo_pl.modeling.tiny import TINY_RECIPE_VERSION, atomic_build_dir

    if name not in BENCH_SHAPES:
        return resolve_model_path(name, cache_dir)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    shape = BENCH_SHAPES[name]
    recipe = {"kind": name, "tokenizer_recipe": TINY_RECIPE_VERSION, "shape": shape, "seed": 0}
    return str(atomic_build_dir(root / name, recipe, partial(_build_qwen2, shape=shape)))


def _problems(args: argparse.Namespace) -> list[Any]:
    from mgrpo_pl.data.loaders import arithmetic_problems

    return arithmetic_problems((args.warmup + args.steps) * args.prompts_per_step, seed=args.seed, ops="+")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_gpu_bytes() -> int | None:
    """Most GPU memory the caching allocator handed out in this process, or None on the CPU."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _summarise(ends: list[float], start: float, warmup: int, per_step: list[dict[str, float]]) -> dict[str, Any]:
    """Per-step wall times from consecutive step ends; throughputs over the measured (post warm-up) steps."""
    times = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    measured, rows = times[warmup:], per_step[warmup:]
    if not measured:
        raise RuntimeError(f"no measured steps: {len(times)} steps ran, {warmup} were warm-up")
    total = sum(measured)
    out: dict[str, Any] = {
        "steps": len(measured),
        "step_times_s": measured,
        "s_per_step": total / len(measured),
        "steps_per_s": len(measured) / total,
        "warmup_step_s": times[:warmup],
    }
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[f"{key}_per_step"] = sum(values) / len(values)
    out["generated_tokens_per_s"] = sum(r["generated_tokens"] for r in rows) / total
    out["trained_tokens_per_s"] = sum(r["trained_tokens"] for r in rows) / total
    return out


# -- mgrpo_pl -----------------------------------------------------------------------------------------------------
class _EmulatedReward:
    """math-verify scores each text (its cost is paid), then a deterministic coin on the text sets the outcome."""

    def __init__(self, inner: Any, pass_rate: float) -> None:
        self.inner, self.threshold = inner, int(pass_rate * 1000)

    def __call__(self, completions: list[str], answers: list[str]) -> Any:
        import torch

        self.inner(completions, answers)
        coin = [zlib.crc32(f"{c}\x00{a}".encode()) % 1000 < self.threshold for c, a in zip(completions, answers)]
        return torch.tensor(coin, dtype=torch.float32)


def run_mgrpo(args: argparse.Namespace, layer2: bool) -> dict[str, Any]:
    """Fit ``warmup + steps`` real Lightning steps of mgrpo_pl and time them."""
    import torch
    from lightning.pytorch import Callback, Trainer

    from callbacks import RolloutCallback
    from mgrpo_pl.data.datamodule import MGRPODataModule, ProblemSet
    from mgrpo_pl.module import MGRPOModule
    from mgrpo_pl.rewards import MathReward
    from mgrpo_pl.rollout.config import RolloutConfig
    from mgrpo_pl.rollout.types import SamplingConfig
    from mgrpo_pl.settings import EfficiencySettings, LossSettings, OptimSettings

    class StepClock(Callback):
        def __init__(self) -> None:
            self.start, self.ends, self.batch_starts, self.rows = 0.0, [], [], []

        def on_train_start(self, trainer: Trainer, pl_module: MGRPOModule) -> None:
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer: Trainer, pl_module: MGRPOModule, batch: Any, batch_idx: int) -> None:
            self.batch_starts.append(time.perf_counter())

        def on_train_batch_end(
            self, trainer: Trainer, pl_module: MGRPOModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.ends.append(time.perf_counter())
            s = batch.stats
            self.rows.append(
                {
                    "generated_tokens": s["tokens/generated"],
                    "trained_tokens": float(batch.completion_lengths.sum()),
                    "prompt_tokens": float(batch.prompt_lengths[batch.layer == 1].sum()),
                    "sequences": float(len(batch)),
                    "layer2_sequences": float((batch.layer == 2).sum()),
                    "kept_queries": s.get("layer2/kept_queries", 0.0),
                    "verified_queries": s.get("layer2/verified_queries", 0.0),
                    "generate_s": s["time/generate_s"],
                    "reward_s": s["time/reward_s"],
                    "completion_len": s["rollout/completion_len"],
                }
            )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    math_reward = MathReward(num_workers=args.reward_workers)
    reward = (
        _EmulatedReward(math_reward, args.l2_pass_rate) if layer2 and args.l2_pass_rate is not None else math_reward
    )
    module = MGRPOModule(
        model=args.model_dir,
        temperature=args.temperature,
        loss=LossSettings(beta=args.beta, clip_eps=args.epsilon),
        efficiency=EfficiencySettings(
            micro_batch_tokens=(
                args.layer2_micro_batch_tokens if layer2 and args.layer2_micro_batch_tokens else args.micro_batch_tokens
            ),
            gradient_checkpointing=args.mgrpo_checkpointing,
            memory_efficient_mlp=not args.plain_mlp,
            shared_prefix=not args.no_shared_prefix,
            prefix_tree=not args.no_prefix_tree,
            reference_dtype=args.reference_dtype,
        ),
        optim=OptimSettings(lr_schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0, fused=True),
    )
    sampling = SamplingConfig(max_new_tokens=args.max_completion_length, temperature=args.temperature)
    data = MGRPODataModule(
        train=ProblemSet("arithmetic", options={"n": len(_problems(args)), "seed": args.seed, "ops": "+"}),
        batch_size=args.prompts_per_step,
        rollout=RolloutConfig(
            num_generations=args.num_generations,
            layer2=layer2,
            num_corrections=args.num_corrections,
            reuse_probe=layer2 and args.reuse_probe,
            joint_layer2=layer2 and args.joint_layer2,
            max_kept_per_problem=args.max_kept_per_problem,
            sampling=sampling,
            instruction=INSTRUCTION,
            advantage_scaling="group",
        ),
        reward=reward,
        shuffle=False,
    )
    engine_kwargs: dict[str, Any] = {"max_model_len": 2048, "cpu_kv_cache_gib": 1.0} if args.engine == "vllm" else {}
    if args.engine_dtype is not None:
        engine_kwargs["dtype"] = args.engine_dtype
    if args.no_prefix_cache and args.engine == "transformers":
        engine_kwargs["prefix_cache_mib"] = 0
    # The transformers engine shares the policy in the GRPO part (unless it samples in another dtype); the MGRPO part
    # keeps a copy so that the per-step weight refresh is a real copy whose time is measured. vLLM always gets a push.
    source = RolloutCallback(engine=args.engine, share_weights=False if layer2 else None, engine_kwargs=engine_kwargs)
    clock = StepClock()
    trainer = Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        precision=args.precision,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[source, clock],  # the clock last: a step ends after the weight refresh
    )
    try:
        trainer.fit(module, data)
    finally:
        math_reward.close()
    out = _summarise(clock.ends, clock.start, args.warmup, clock.rows)
    # push_times[0] is the refresh at train start; [k + 1] follows step k.
    pushes = source.push_times[1 + args.warmup :]
    phases = [e - b for b, e in zip(clock.batch_starts, clock.ends)][args.warmup :]
    out.update(
        framework="mgrpo_pl",
        layer2=layer2,
        share_weights=bool(getattr(source.engine(), "shared", False)),
        engine=args.engine,
        engine_dtype=args.engine_dtype,
        weight_refresh_s=sum(pushes) / max(len(pushes), 1),
        train_step_s=sum(phases) / len(phases) - sum(pushes) / max(len(pushes), 1),
        startup_s=clock.start - t0,
        parameters=sum(p.numel() for p in module.policy.parameters()),
    )
    return out


# -- TRL ----------------------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps of TRL's GRPOTrainer and time them."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mgrpo_pl.rewards import MathReward

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    math_reward = MathReward(num_workers=args.reward_workers)
    counts = {"generated": [], "trained": 0.0, "slots": 0.0, "prompt": 0.0, "score_s": [], "reward_s": []}

    def math_reward_fn(prompts: list, completions: list, completion_ids: list[list[int]], answer: list, **_: Any):
        tick = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        counts["generated"].append(float(sum(len(ids) for ids in completion_ids)))
        scores = math_reward(texts, [str(a) for a in answer]).tolist()
        counts["reward_s"].append(time.perf_counter() - tick)
        return scores

    class CountingTrainer(GRPOTrainer):
        """Adds counters only: real trained tokens, padded completion slots, time spent making each batch."""

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            tick = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            counts["score_s"].append(time.perf_counter() - tick)
            return out

        def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
            counts["trained"] += float(inputs["completion_mask"].sum())
            counts["slots"] += float(inputs["completion_mask"].numel())
            counts["prompt"] += float(inputs["prompt_mask"].sum())
            return super()._compute_loss(model, inputs)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.ends, self.trained = 0.0, [], []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())
            self.trained.append((counts["trained"], counts["slots"], counts["prompt"]))

    problems = _problems(args)
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"{p.question}\n{INSTRUCTION}"}], "answer": p.answer}
            for p in problems
        ]
    )
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.num_generations,
            gradient_accumulation_steps=args.prompts_per_step,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=args.beta,
            epsilon=args.epsilon,
            loss_type="grpo",
            scale_rewards="group",
            num_iterations=1,
            use_vllm=False,
            bf16=args.precision == "bf16-mixed",
            fp16=False,
            use_cpu=args.device == "cpu",
            gradient_checkpointing=not args.trl_no_checkpointing,
            model_init_kwargs={"dtype": torch.float32},
            max_steps=args.warmup + args.steps,
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
        )
        clock = StepClock()
        trainer = CountingTrainer(
            model=args.model_dir,
            reward_funcs=math_reward_fn,
            args=config,
            train_dataset=dataset,
            callbacks=[clock],
        )
        try:
            trainer.train()
        finally:
            math_reward.close()
    # Counters are cumulative; a step's share is the difference between consecutive step ends.
    trained, slots, prompt = (
        [b[k] - a[k] for a, b in zip([(0.0, 0.0, 0.0), *clock.trained[:-1]], clock.trained)] for k in range(3)
    )
    rows = [
        {
            "generated_tokens": counts["generated"][i],
            "trained_tokens": trained[i],
            "completion_slots": slots[i],
            "prompt_tokens": prompt[i],
            "generate_and_score_s": counts["score_s"][i],
            "reward_s": counts["reward_s"][i],
            "completion_len": counts["generated"][i] / (args.num_generations * args.prompts_per_step),
        }
        for i in range(len(clock.ends))
    ]
    out = _summarise(clock.ends, clock.start, args.warmup, rows)
    out.update(
        framework="trl",
        gradient_checkpointing=bool(config.gradient_checkpointing),
        optim=str(config.optim),
        startup_s=clock.start - t0,
        parameters=sum(p.numel() for p in trainer.model.parameters()),
    )
    return out
