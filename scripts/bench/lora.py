"""Full fine-tuning against LoRA on the demo model, side by side in one run: peak RSS, step time, weight push.

Each variant is a real ``mgrpo fit`` of the demo config (its engine: vLLM where installed) in its own process, one
after the other, so each has the machine to itself and its own peak RSS (``os.wait4``'s ``ru_maxrss``: the process
and the workers it waited for). From each run's TensorBoard log: the mean training time of a step (``time/train_s``:
log-probs, loss, backward, optimizer), the mean weight push into the engine (``time/weight_push_s``) and the mean
wall time of a step, each over the steps after the first (the first includes start-up costs).

Examples:
    python -m scripts.bench.lora                      # 3 steps each, about 8 minutes on 2 CPU cores
    python -m scripts.bench.lora --steps 2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "full fine-tuning": [],
    "LoRA r=16": ["--model.lora.r=16", "--model.lora.alpha=32", "--model.optimizer.init_args.lr=1.0e-4"],
}


def run(name: str, flags: list[str], root: Path, options: argparse.Namespace) -> dict[str, float]:
    """One ``mgrpo fit`` of the config; its peak RSS and mean step figures."""
    args = [sys.executable, "-m", "mgrpo_pl", "fit", "--config", str(REPO / options.config)]
    args += [f"--model.model={options.model}"] if options.model else []
    args += [
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={options.steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false",
        # The demo's engine without its checkpoint callback (the full run's checkpoint is a 1.6 GB file).
        "--trainer.callbacks=[{class_path: callbacks.RolloutCallback, init_args: {engine: auto, engine_kwargs: "
        "{cpu_kv_cache_gib: 0.25, max_model_len: 1024}}}]",
        f"--data.rollout.sampling.max_new_tokens={options.max_new_tokens}",
        *flags,
    ]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "stderr.txt").open("w") as err:
        process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        # wait4, not wait: the rusage of this child alone (its peak RSS), not the maximum over every child so far.
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{name}: mgrpo fit failed ({code}):\n{(root / 'stderr.txt').read_text()[-3000:]}")
    events = EventAccumulator(str(root / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()

    def mean(tag: str) -> float:
        values = [e.value for e in events.Scalars(tag)][1:]  # the first step pays the start-up
        return statistics.fmean(values) if values else float("nan")

    step = [e.wall_time for e in events.Scalars("train/loss")]
    return {
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux
        "train_s": mean("time/train_s"),
        "push_s": mean("time/weight_push_s"),
        "step_s": statistics.fmean([b - a for a, b in zip(step, step[1:])]) if len(step) > 1 else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant (the first is not counted)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion budget of every layer")
    parser.add_argument("--config", default="configs/demo.yaml", help="the run's config, relative to the repository")
    parser.add_argument("--model", default=None, help="another model than the config's")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="mgrpo_bench_lora_") as tmp:
        for i, (name, flags) in enumerate(VARIANTS.items()):
            results[name] = run(name, flags, Path(tmp) / str(i), args)
            print(f"{name}: {results[name]}", flush=True)
    full, lora = results["full fine-tuning"], results["LoRA r=16"]
    print("\n| | peak RSS (GiB) | step (s) | training part (s) | weight push (s) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_rss_gib']:.2f} | {r['step_s']:.1f} | {r['train_s']:.2f} | {r['push_s']:.2f} |")
    keys = ("peak_rss_gib", "step_s", "train_s", "push_s")
    print("| LoRA / full | " + " | ".join(f"{lora[k] / full[k]:.2f}" if full[k] else "-" for k in keys) + " |")
    return results


if __name__ == "__main__":
    main()
