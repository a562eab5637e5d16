"""The training layouts side by side on one MGRPO-shaped batch: left-padded, shared prefix, and the prefix tree.

One invocation builds a synthetic two-layer rollout batch of the benchmark's shape (B problems x G layer-1 samples,
K kept queries per problem, each query a layer-1 sequence less its end token plus a guide phrase, H corrections per
query; every completion runs to the length limit, as a random model's do) and runs ``MGRPOModule.backward_batch`` on
it once per layout in alternating rounds: the reference forward, the policy forward and backward, the real loss, at
the same micro-batch token budget. No optimizer step, so every round trains the same weights.

Reported per layout: seconds per pass (best and median of the rounds), micro-batches, computed tokens (the positions
the forwards run, padding included), the ratio to the left-padded layout, and the largest gradient difference from
it. The gradients are the same work done three ways, so that difference is float32 rounding; a wrong layout shows
up there before it shows up in a training curve.

Examples:
    python -m scripts.bench.layout                                   # the 30M benchmark model, ~2 minutes
    python -m scripts.bench.layout --micro-batch-tokens 2048 --rounds 5
    python -m scripts.bench.layout --model tiny --problems 2 --num-generations 2 --completion-length 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

LAYOUTS = ("padded", "shared", "tree")
# (shared_prefix, prefix_tree) for each layout's EfficiencySettings
SWITCHES = {"padded": (False, False), "shared": (True, False), "tree": (True, True)}


def synthetic_batch(args: argparse.Namespace, vocab: int, eos: int) -> Any:
    """Layer-1 rows first, then each kept query's H rows, the way the rollout orders them; advantages are random."""
    from mgrpo_pl.rollout.types import RolloutBatch

    g = torch.Generator().manual_seed(args.seed)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(3, vocab, (n,), generator=g)

    def completion() -> torch.Tensor:
        return torch.cat([tokens(args.completion_length - 1), torch.tensor([eos])])

    seqs, prompt_lengths = [], []
    for _ in range(args.problems):
        prompt = tokens(args.prompt_length)
        for _ in range(args.num_generations):
            seqs.append(torch.cat([prompt, completion()]))
            prompt_lengths.append(args.prompt_length)
    num_l1 = len(seqs)
    for problem in range(args.problems):
        for k in range(args.kept_per_problem):
            # the probe's query: the layer-1 sequence without its end token, then the guide phrase
            query = torch.cat([seqs[problem * args.num_generations + k][:-1], tokens(args.guide_length)])
            for _ in range(args.num_corrections):
                seqs.append(torch.cat([query, completion()]))
                prompt_lengths.append(len(query))
    n = len(seqs)
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(prompt_lengths),
        advantages=torch.randn(n, generator=g),
        layer=torch.tensor([1] * num_l1 + [2] * (n - num_l1)),
        truncated=torch.zeros(n, dtype=torch.bool),
        rewards=torch.zeros(n),
        num_problems=args.problems,
        correct_t1=torch.zeros(num_l1, dtype=torch.bool),
        correct_t2=torch.zeros(num_l1, dtype=torch.bool),
    )


def layout_shape(batch: Any, budget: int, layout: str, pad_id: int) -> tuple[int, int]:
    from mgrpo_pl.layouts import computed_tokens, micro_batch_layout

    shared, tree = SWITCHES[layout]
    plan, collate = micro_batch_layout(batch, budget, shared=shared, tree=tree)
    return len(plan), sum(computed_tokens(collate(batch, rows, pad_id, False)) for rows in plan)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mgrpo_pl.module import MGRPOModule
    from mgrpo_pl.settings import EfficiencySettings, LossSettings
    from scripts.bench.runners import prepare_model

    load_before = list(os.getloadavg())
    torch.set_num_threads(args.threads)
    module = MGRPOModule(
        model=prepare_model(args.model, args.cache_dir),
        loss=LossSettings(beta=args.beta),
        efficiency=EfficiencySettings(micro_batch_tokens=args.micro_batch_tokens),
    )
    module.configure_model()
    tokenizer = module.tokenizer
    batch = synthetic_batch(args, len(tokenizer), int(tokenizer.eos_token_id))
    pad_id = int(tokenizer.pad_token_id)

    def backward(layout: str) -> tuple[float, dict[str, torch.Tensor]]:
        module.efficiency.shared_prefix, module.efficiency.prefix_tree = SWITCHES[layout]
        module.policy.zero_grad(set_to_none=False)
        start = time.perf_counter()
        module.backward_batch(batch)
        seconds = time.perf_counter() - start
        return seconds, {n: p.grad for n, p in module.policy.named_parameters() if p.grad is not None}

    layouts = args.layouts.split(",")
    times: dict[str, list[float]] = {name: [] for name in layouts}
    grad_diff: dict[str, float] = {}
    # Warm-up, untimed: the padded pass first, whose gradient every layout is compared with, then the others.
    reference_grads = {n: g.clone() for n, g in backward("padded")[1].items()}
    for name in layouts:
        if name != "padded":
            backward(name)
    for _ in range(args.rounds):
        for name in layouts:
            seconds, grads = backward(name)
            times[name].append(seconds)
            diff = max(float((grads[n] - g).abs().max()) for n, g in reference_grads.items())
            grad_diff[name] = max(grad_diff.get(name, 0.0), diff)
    results = {}
    for name in layouts:
        micro, computed = layout_shape(batch, args.micro_batch_tokens, name, pad_id)
        results[name] = {
            "best_s": min(times[name]),
            "median_s": statistics.median(times[name]),
            "rounds_s": times[name],
            "micro_batches": micro,
            "computed_tokens": computed,
            "max_grad_diff_vs_padded": grad_diff[name],
        }
    trained = sum(len(s) - int(p) for s, p in zip(batch.sequences, batch.prompt_lengths))
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": len(batch),
        "trained_tokens": trained,
        "loadavg_before": load_before,
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    results = report["results"]
    base = results.get("padded")
    lines = [
        f"model `{s['model']}`, {report['rows']} rows ({s['problems']} problems x G={s['num_generations']}, "
        f"{s['kept_per_problem']} kept queries per problem x H={s['num_corrections']}), {report['trained_tokens']} "
        f"trained tokens, {s['micro_batch_tokens']}-token micro-batches, {s['threads']} threads, {s['rounds']} rounds, "
        f"load before {report['loadavg_before'][0]:.2f}",
        "",
        "| layout | best s | median s | best vs padded | micro-batches | computed tokens | max grad diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['best_s'] / base['best_s']:.2f}" if base else "-"
        lines.append(
            f"| {name} | {r['best_s']:.2f} | {r['median_s']:.2f} | {ratio} | {r['micro_batches']} | "
            f"{r['computed_tokens']} | {r['max_grad_diff_vs_padded']:.1e} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2-30m", help="qwen2-30m (default, built offline), tiny, or a folder")
    p.add_argument("--cache-dir", default=None, help="model cache root (default: mgrpo_pl's cache)")
    p.add_argument("--problems", type=int, default=4, help="B")
    p.add_argument("--num-generations", type=int, default=8, help="G")
    p.add_argument(
        "--kept-per-problem", type=int, default=4, help="layer-2 queries per problem (G/2: a 50%% pass rate)"
    )
    p.add_argument("--num-corrections", type=int, default=4, help="H")
    p.add_argument("--prompt-length", type=int, default=34, help="the benchmark's chat-templated prompts")
    p.add_argument("--completion-length", type=int, default=64)
    p.add_argument("--guide-length", type=int, default=12, help="tokens of the guide phrase")
    p.add_argument("--micro-batch-tokens", type=int, default=1024)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per layout, alternating")
    p.add_argument("--beta", type=float, default=0.001, help="KL weight (> 0 runs the reference forward)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    layouts = args.layouts.split(",")
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        p.error(f"--layouts: unknown {sorted(unknown)}; choose from {', '.join(LAYOUTS)}")
    if len(set(layouts)) != len(layouts):
        p.error(f"--layouts: {args.layouts} names a layout twice")
    if args.kept_per_problem > args.num_generations:
        p.error(
            f"--kept-per-problem ({args.kept_per_problem}) cannot exceed --num-generations ({args.num_generations})"
        )
    least = {"kept_per_problem": 0, "guide_length": 0, "beta": 0, "micro_batch_tokens": 1, "threads": 1}
    for flag in ("problems", "num_generations", "num_corrections", "completion_length", "prompt_length", "rounds"):
        least[flag] = 1
    for flag, low in least.items():
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
