"""Rollout throughput of the vLLM engine against the transformers engine, and the cost of the per-step weight push.

Both engines get the same model, the same chat-templated prompts and the same sampling (P prompts x S samples,
up to T new tokens), as one ``generate`` call, like one layer-1 rollout of a training step. Reported:

* real tokens/s: completion tokens actually produced (padding and tokens after the end token do not count) per
  second of ``generate``, median over the timed repeats after one untimed warm-up call;
* the vLLM weight push (``update_weights`` from the live policy, in place) and the read-back checksum;
* the push as a share of a training step, where the step is timed here as: one rollout by vLLM + a training pass
  over its sequences (reference forward, policy forward + backward, AdamW step; MGRPOModule does the same work
  per layer) + the push. The step is an estimate of one layer's work, not a full two-layer MGRPO step.

Examples:
    python -m scripts.bench.rollout                                   # tiny random model, seconds
    python -m scripts.bench.rollout --model smollm2-135m-instruct     # the demo model (a few minutes)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

QUESTIONS = [
    "What is 7 + 5?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "What is 12 minus 9?",
    "A box holds 6 pencils. How many pencils are in 3 boxes?",
    "What is 8 + 6?",
    "Sara reads 5 pages a day. How many pages does she read in 4 days?",
    "What is 15 minus 7?",
    "What is 9 + 9?",
]
INSTRUCTION = "Put the final answer in \\boxed{}."


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` over ``repeats`` calls (after one untimed warm-up) and the last result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _train_pass(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sequences: list[tuple[list[int], int]],
    pad_id: int,
    micro_batch: int,
) -> None:
    """Reference forward, policy forward + backward of -mean(log p) of the completions, one AdamW step.

    ``sequences``: (prompt + completion ids, completion length). Micro-batches of ``micro_batch`` sequences bound
    memory as MGRPOModule's token budget does (full-vocabulary logits are the big tensor).
    """
    from mgrpo_pl.algo.logprobs import token_logprobs

    total = sum(n for _, n in sequences)
    optimizer.zero_grad()
    for start in range(0, len(sequences), micro_batch):
        chunk = sequences[start : start + micro_batch]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target_mask = torch.zeros((len(chunk), width - 1))
        for row, (seq, n) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            target_mask[row, len(seq) - n - 1 : len(seq) - 1] = 1
        with torch.no_grad():
            reference(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = -(token_logprobs(logits[:, :-1], ids[:, 1:]) * target_mask).sum() / total
        loss.backward()
    optimizer.step()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mgrpo_pl.method import encode_prompt
    from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from mgrpo_pl.rollout.engines import TransformersEngine
    from mgrpo_pl.rollout.types import SamplingConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = resolve_model_path(args.model)
    policy = load_causal_lm(path, dtype=args.dtype)
    tokenizer = load_tokenizer(path)
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    prompts = [encode_prompt(tokenizer, q, INSTRUCTION) for q in questions]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    n = args.samples
    report: dict[str, Any] = {"model": args.model, "parameters": sum(p.numel() for p in policy.parameters())}

    hf = TransformersEngine(policy, tokenizer, max_batch_size=args.prompts * n)
    hf_s, hf_out = median_time(lambda: hf.generate(prompts, sampling, n), args.repeats)
    report["transformers"] = {"generate_s": hf_s, "tokens": hf_out.num_tokens}

    start = time.perf_counter()
    from mgrpo_pl.rollout.engines.vllm import VLLMEngine

    report["vllm_import_s"] = time.perf_counter() - start
    engine = VLLMEngine(policy, tokenizer, cpu_kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len)
    report["vllm_start_s"] = engine.start_s
    v_s, v_out = median_time(lambda: engine.generate(prompts, sampling, n), args.repeats)
    report["vllm"] = {"generate_s": v_s, "tokens": v_out.num_tokens}

    push_s, _ = median_time(lambda: engine.update_weights(policy.named_parameters()), args.repeats)

    def readback() -> float:
        engine._checksum = None  # time the read-back itself, not the per-push cache
        return engine.weights_checksum()

    checksum_s, _ = median_time(readback, args.repeats)
    report["push_s"], report["checksum_s"] = push_s, checksum_s

    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    sequences = [(prompts[i // n] + c, len(c)) for i, c in enumerate(v_out.token_ids)]
    pad_id = int(tokenizer.pad_token_id)
    train_s, _ = median_time(
        lambda: _train_pass(policy, reference, optimizer, sequences, pad_id, args.micro_batch), args.repeats
    )
    report["train_s"] = train_s
    engine.close()
    return report


def table(r: dict[str, Any]) -> str:
    hf, v = r["transformers"], r["vllm"]
    hf_rate, v_rate = hf["tokens"] / hf["generate_s"], v["tokens"] / v["generate_s"]
    step = v["generate_s"] + r["train_s"] + r["push_s"]
    lines = [
        f"model: {r['model']} ({r['parameters'] / 1e6:.1f}M parameters); vLLM import {r['vllm_import_s']:.1f} s, "
        f"engine start {r['vllm_start_s']:.1f} s",
        "",
        "| engine | generate (s) | real tokens | tokens/s | vs transformers |",
        "|---|---|---|---|---|",
        f"| transformers | {hf['generate_s']:.2f} | {hf['tokens']} | {hf_rate:.0f} | 1.00x |",
        f"| vllm | {v['generate_s']:.2f} | {v['tokens']} | {v_rate:.0f} | {v_rate / hf_rate:.2f}x |",
        "",
        "| per training step (vLLM) | seconds | share of step |",
        "|---|---|---|",
        f"| rollout (vLLM generate) | {v['generate_s']:.3f} | {v['generate_s'] / step:.1%} |",
        f"| train pass (ref fwd + policy fwd/bwd + AdamW) | {r['train_s']:.3f} | {r['train_s'] / step:.1%} |",
        f"| weight push (in place) | {r['push_s']:.3f} | {r['push_s'] / step:.1%} |",
        f"| step total | {step:.3f} | 100% |",
        f"| (read-back checksum, once per push) | {r['checksum_s']:.3f} | {r['checksum_s'] / step:.1%} |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, tiny-untied, smollm2-135m-instruct, or a folder")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (policy and engine)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout (P)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (S)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest completion (T)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up call (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both engines and training")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM CPU KV-cache size")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM context length")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward in the train pass")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    report = run(parse_args(argv))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
