"""mgrpo_pl against TRL's GRPOTrainer on the same one-round GRPO work, side by side, on the CPU or one GPU.

One invocation runs, one after the other and each in its own subprocess (so that peak RSS is per framework):

1. ``grpo``  - mgrpo_pl with layer 2 off (one-round GRPO), generating with ``--engine``: ``transformers`` (HF
   ``generate`` on the policy itself, as TRL does on CPU) or ``vllm`` (mgrpo_pl's in-process vLLM engine, with the
   weights pushed after every step);
2. ``trl``   - TRL's ``GRPOTrainer`` with the settings of FACTS.md ("The peer to beat");
3. ``mgrpo`` - mgrpo_pl with layer 2 on (G samples, H corrections per kept query) and a separate engine copy
   (``share_weights=False`` with the transformers engine), so that the per-step weight refresh is a real copy whose
   time can be measured.

Equal work (1 vs 2): the same model folder loaded by both, the same prompts ("What is a + b?" + "Put the answer in
\\boxed{}." as one user message through the same chat template), G samples for each of P prompts per optimizer step,
the same max completion length, temperature, AdamW (fused, lr, no weight decay, constant schedule), grad-norm clip 1,
beta with a separate fp32 reference model, PPO clip epsilon, the same loss normalisation (mean over a completion's
tokens, then over completions: TRL's ``loss_type="grpo"``), group-scaled advantages, one optimizer step per batch,
fp32 weights on the same device (``--device``) with the same thread count and precision (``--precision
bf16-mixed``: forwards under bf16 autocast on both sides), and the same reward (``mgrpo_pl.rewards.MathReward``,
wrapped into TRL's reward-function signature). Token counts are real tokens: generated = completion tokens up to and
including the end-of-turn token (TRL pads every completion of a batch to the longest; padding is not counted),
trained = tokens under the loss mask (the same set).

What differs unavoidably (implementation, not work):
- Sampling is random: the two frameworks draw different completions, so the real token counts differ a little from
  step to step; per-token throughputs are the fair figures, steps/s is fair when the mean completion lengths match
  (both are printed).
- Micro-batching: TRL runs ``per_device_train_batch_size`` (G) sequences, one group, per forward/backward and pads
  completions to the longest of the generation batch; mgrpo_pl packs sequences by a token budget
  (``--micro-batch-tokens``, 1024 by default here: about two groups of ~530 computed tokens at the default
  settings). The budget trades speed for memory: 1024 met both the speed and the RSS target in one run, 2048 was
  about as fast with ~0.25 GiB more peak RSS, and at 640 (one group per pass, like TRL) the backward is ~15% slower
  (its weight gradients reduce over fewer tokens); docs/performance.md has the figures.
- Gradient checkpointing: TRL's default (on) is kept; mgrpo_pl's default (off) is kept. Both are memory/speed knobs.
- TRL computes per-token entropies for logging and pads prompts; mgrpo_pl records behaviour log-probs while sampling.
- Advantage epsilon: TRL divides by ``std + 1e-4``, mgrpo_pl by ``std + 1e-6`` (no cost difference).
- The trainers' own overheads (Lightning loop and logging vs HF Trainer loop and logging) are part of what is timed.

``--engine-dtype bfloat16`` is not equal work: mgrpo_pl then samples from a bf16 copy of the fp32 policy (as a vLLM
engine serving in bf16 does) while TRL samples with its fp32 model. The loss is the same (the trainer recomputes every
log-prob with its fp32 weights), but the samples come from a slightly different distribution. Report it apart.
``--reference-dtype bfloat16`` is not equal work either: mgrpo_pl's frozen reference is then held and run in bf16 (as
verl holds it) while TRL's is fp32; only the ``beta``-weighted KL term sees the difference.

The layer-2 run (3) uses an emulated reward by default (``--l2-pass-rate``): math-verify scores every completion (so
its cost is paid) and a deterministic coin on the text then decides the outcome with that rate, because a random
model never answers correctly and layer 2 would keep no query, making the MGRPO step look as cheap as GRPO's.

The machine load (``os.getloadavg``, 1-minute average) is recorded before and after each part; the benchmark itself
accounts for about ``--threads`` of it, so anything well above that means other work shared the cores and the
figures are slowed (on 2 shared cores, by 2-5x) and noisy.

Timing: a step is the wall time between consecutive optimizer-step ends (rollout, reward, reference and policy
passes, optimizer, weight refresh, logging: everything); ``--warmup`` steps are run first and not measured.

Example:
    python -m scripts.bench.trl --out bench.json                  # ~30M random Qwen2, 1 warm-up + 5 steps each
    python -m scripts.bench.trl --model smollm2-135m-instruct --steps 3
    python -m scripts.bench.trl --device cuda --precision bf16-mixed --model qwen2-360m   # see docs/gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Only the standard library at module level: math-verify's worker processes re-import this script.
from scripts.bench.report import compare, markdown, paired_ratios

PARTS = ("grpo", "trl", "mgrpo")
ROUND_KEYS = ("s_per_step", "steps_per_s", "peak_rss_bytes", "loadavg_before", "loadavg_after")
BENCH_MODEL = "qwen2-30m"  # the default model, built by runners.prepare_model
ROOT = Path(__file__).resolve().parents[2]  # the child runs -m scripts.bench.trl from here


def _runners() -> Any:
    """``scripts.bench.runners`` (imported late: it pulls in torch)."""
    from scripts.bench import runners

    return runners


# -- orchestration ------------------------------------------------------------------------------------------------
def _child(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    runners = _runners()
    result = runners.run_trl(args) if args.only == "trl" else runners.run_mgrpo(args, layer2=args.only == "mgrpo")
    result.update(
        peak_rss_bytes=runners.peak_rss_bytes(),
        peak_gpu_bytes=runners.peak_gpu_bytes(),
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
    )
    Path(args.result).write_text(json.dumps(result))


def _child_argv(args: argparse.Namespace, part: str, result: str) -> list[str]:
    argv = [sys.executable, "-m", "scripts.bench.trl", "--only", part, "--result", result]
    for key in (
        "model_dir threads steps warmup num_generations prompts_per_step max_completion_length num_corrections "
        "temperature lr beta epsilon micro_batch_tokens reward_workers seed engine device precision"
    ).split():
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.engine_dtype is not None:
        argv += ["--engine-dtype", args.engine_dtype]
    if args.reference_dtype is not None:
        argv += ["--reference-dtype", args.reference_dtype]
    if args.l2_pass_rate is not None:
        argv += ["--l2-pass-rate", str(args.l2_pass_rate)]
    if args.layer2_micro_batch_tokens is not None:
        argv += ["--layer2-micro-batch-tokens", str(args.layer2_micro_batch_tokens)]
    if args.max_kept_per_problem is not None:
        argv += ["--max-kept-per-problem", str(args.max_kept_per_problem)]
    switches = (
        "mgrpo_checkpointing reuse_probe joint_layer2 trl_no_checkpointing no_shared_prefix plain_mlp no_prefix_cache "
        "no_prefix_tree"
    )
    argv += [f"--{key.replace('_', '-')}" for key in switches.split() if getattr(args, key)]
    return argv


def _run_part(args: argparse.Namespace, part: str) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-part-") as tmp:
        result = Path(tmp) / "result.json"
        tick = time.perf_counter()
        argv = _child_argv(args, part, str(result))
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"benchmark part {part!r} failed (exit {proc.returncode}):\n{tail}")
        out = json.loads(result.read_text())
    out["process_wall_s"] = time.perf_counter() - tick
    phases = ("generate_s_per_step", "reward_s_per_step", "train_step_s", "generate_and_score_s_per_step")
    split = ", ".join(f"{k.split('_s')[0]} {out[k]:.2f} s" for k in phases if k in out)
    print(
        f"[bench] {part}: {out['s_per_step']:.2f} s/step over {out['steps']} steps ({split})",
        file=sys.stderr,
        flush=True,
    )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default=BENCH_MODEL,
        help=f"{BENCH_MODEL} (default), qwen2-360m (GPU size), tiny, smollm2-135m-instruct, a folder",
    )
    p.add_argument("--cache-dir", default=None, help="model cache root (default: mgrpo_pl's cache)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of grpo,trl,mgrpo")
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps per part")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--num-generations", type=int, default=8, help="G")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--num-corrections", type=int, default=4, help="H, layer-2 samples per kept query (mgrpo part)")
    p.add_argument(
        "--reuse-probe", action="store_true", help="mgrpo part: the verified probe is one of the H samples (H-1 new)"
    )
    p.add_argument(
        "--joint-layer2", action="store_true", help="mgrpo part: probes and layer-2 groups in one engine call"
    )
    p.add_argument(
        "--max-kept-per-problem",
        type=int,
        default=None,
        help="mgrpo part: most layer-2 queries kept per problem, drawn from the verified (default: all, the paper)",
    )
    p.add_argument("--l2-pass-rate", type=float, default=0.5, help="emulated correct rate in the mgrpo part; <0: real")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.001)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=1024,
        help="mgrpo_pl's computed tokens per forward (one group is ~G * max completion; see the docstring)",
    )
    p.add_argument(
        "--layer2-micro-batch-tokens",
        type=int,
        default=None,
        help="the mgrpo part's budget instead (a problem's layer-1 group and its layer-2 groups are ~1,600 tokens at a "
        "50%% pass rate, which the prefix tree trains together only in one micro-batch)",
    )
    p.add_argument("--mgrpo-checkpointing", action="store_true", help="gradient checkpointing in mgrpo_pl too")
    p.add_argument(
        "--plain-mlp", action="store_true", help="mgrpo_pl: the MLPs' stock autograd (memory_efficient_mlp=False)"
    )
    p.add_argument(
        "--no-shared-prefix", action="store_true", help="mgrpo_pl: train every row in the plain padded layout"
    )
    p.add_argument(
        "--no-prefix-tree",
        action="store_true",
        help="mgrpo part: train layer-2 groups without the keys and values of their layer-1 row (prefix_tree=False)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="mgrpo part: the transformers engine recomputes layer 2's query prefixes (prefix_cache_mib=0)",
    )
    p.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="mgrpo_pl's generation engine (TRL generates with HF generate on CPU in every case)",
    )
    p.add_argument(
        "--engine-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="mgrpo_pl samples from a copy in this precision (default: the policy's); not TRL's work, see docstring",
    )
    p.add_argument(
        "--reference-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="mgrpo_pl holds its frozen reference in this precision (default: the policy's); not TRL's work",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both frameworks train")
    p.add_argument(
        "--precision",
        choices=("32-true", "bf16-mixed"),
        default="32-true",
        help="both: fp32 weights; bf16-mixed runs forwards under bf16 autocast (TRL's bf16=True)",
    )
    p.add_argument("--trl-no-checkpointing", action="store_true", help="turn off TRL's default gradient checkpointing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reward-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="rounds over the parts; each part reports its fastest")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--only", choices=PARTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.l2_pass_rate is not None and args.l2_pass_rate < 0:
        args.l2_pass_rate = None
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.only:
        _child(args)
        return {}
    args.model_dir = _runners().prepare_model(args.model, args.cache_dir)
    parts = [p for p in PARTS if p in args.parts.split(",")]
    # Repeats alternate the parts (grpo, trl, mgrpo, grpo, ...) so that a burst of other work on shared cores slows
    # one round, not one framework; each part is then represented by its least disturbed (fastest) round.
    rounds: dict[str, list[dict[str, Any]]] = {part: [] for part in parts}
    for _ in range(args.repeats):
        for part in parts:
            rounds[part].append(_run_part(args, part))
    results = {part: max(runs, key=lambda r: r["steps_per_s"]) for part, runs in rounds.items()}
    config = {k: v for k, v in vars(args).items() if k not in ("only", "result")}
    report = {
        "config": config,
        "versions": _versions(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_description(),
        "loadavg_end": os.getloadavg(),
        "results": results,
        "comparison": {**compare(results), **paired_ratios(rounds)},
        "rounds": {part: [{k: r[k] for k in ROUND_KEYS} for r in runs] for part, runs in rounds.items()},
    }
    print(markdown(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def cpu_description() -> str:
    """The CPU's model name and the matrix instructions that set this benchmark's speed (float32 runs on AVX-512 or
    AVX2; bf16 on AVX-512 BF16 or AMX), and which linear kernels mgrpo_pl's transformers engine decodes with."""
    from mgrpo_pl.rollout.engines.cpu.row_linear import onednn_available

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    kernels = "oneDNN" if onednn_available() else "weight-major"
    return f"{name} ({', '.join(isa) or 'flags unknown'}); mgrpo_pl decodes with {kernels} linears"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "lightning", "trl", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


if __name__ == "__main__":
    main()
