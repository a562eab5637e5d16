"""Find an arithmetic problem family of the right difficulty for the CPU demo.

GRPO learns nothing from a group whose samples all score the same, so the demo needs problems that the base model
(SmolLM2-135M-Instruct) gets right neither almost never nor almost always: accuracy between ~20% and ~60% at the
demo's sampling temperature. This script samples completions for several families of generated problems, asked
exactly as the demo asks them (the user message "{question}\\nPlease reason step by step, and put your final answer
within \\boxed{}." through the model's chat template), scores them with math-verify and prints one row per family:
accuracy over all samples, the share of problems whose samples are mixed (some right, some wrong: the groups that
give GRPO a non-zero advantage), mean completion length in tokens (eos included) and generation speed.

Example:
    python -m scripts.probe_demo_difficulty --candidates add_1digit add_0_20 --temperatures 1.0 0.7
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from mgrpo_pl.modeling import load_causal_lm, load_tokenizer

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

Problem = tuple[str, str]  # (question, gold answer as LaTeX)


def _binary(lo: int, hi: int, op: str) -> Callable[[random.Random], Problem]:
    def make(rng: random.Random) -> Problem:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-":
            a, b = max(a, b), min(a, b)  # keep answers non-negative: negatives are a different skill
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"What is {a} {op} {b}?", str(value)

    return make


def _sum3(rng: random.Random) -> Problem:
    a, b, c = (rng.randint(1, 9) for _ in range(3))
    return f"What is {a} + {b} + {c}?", str(a + b + c)


def _mixed_2digit(rng: random.Random) -> Problem:
    return _binary(10, 99, rng.choice("+-*"))(rng)


def _word_add(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?", str(a + b)


CANDIDATES: dict[str, Callable[[random.Random], Problem]] = {
    "add_1digit": _binary(0, 9, "+"),
    "add_0_20": _binary(0, 20, "+"),
    "sub_0_20": _binary(0, 20, "-"),
    "mul_1digit": _binary(2, 9, "*"),
    "sum3_1digit": _sum3,
    "word_add_0_20": _word_add,
    "add_2digit": _binary(10, 99, "+"),
    "mixed_2digit": _mixed_2digit,
}


def make_problems(name: str, count: int, seed: int) -> list[Problem]:
    """Draw ``count`` distinct problems of family ``name`` (fewer if the family is smaller)."""
    rng = random.Random(f"{name}-{seed}")
    seen: dict[str, str] = {}
    for _ in range(count * 50):
        question, gold = CANDIDATES[name](rng)
        seen.setdefault(question, gold)
        if len(seen) == count:
            break
    return list(seen.items())


def generate(model, tokenizer, prompts: list[str], *, temperature: float, max_new_tokens: int) -> tuple[list, int]:
    """Sample one completion per prompt (left-padded batch). Returns the texts and the count of real new tokens."""
    batch = tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts],
        add_generation_prompt=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,  # plain sampling at the temperature, as vLLM does by default
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, batch["input_ids"].shape[1] :]
    texts, real_tokens = [], 0
    for row in new:
        # A completion ends at its first eos (counted as a generated token); what follows is padding.
        ends = (row == tokenizer.eos_token_id).nonzero()
        length = int(ends[0]) + 1 if len(ends) else len(row)
        real_tokens += length
        texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
    return texts, real_tokens


def score(completions: list[str], golds: list[str]) -> list[bool]:
    """math-verify each completion against its gold answer (gold first, wrapped in $...$ so raw LaTeX parses)."""
    from math_verify import parse, verify

    return [bool(verify(parse(f"${gold}$"), parse(text))) for text, gold in zip(completions, golds, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--num-problems", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4, help="completions per problem")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=80, help="sequences per generate call")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print this many completions per candidate")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=args.dtype).eval()

    rows = []
    for temperature in args.temperatures:
        for name in args.candidates:
            torch.manual_seed(args.seed)
            problems = make_problems(name, args.num_problems, args.seed)
            prompts = [f"{q}\n{INSTRUCTION}" for q, _ in problems for _ in range(args.samples)]
            golds = [g for _, g in problems for _ in range(args.samples)]
            texts, tokens, start = [], 0, time.perf_counter()
            for i in range(0, len(prompts), args.batch_size):
                chunk, n = generate(
                    model,
                    tokenizer,
                    prompts[i : i + args.batch_size],
                    temperature=temperature,
                    max_new_tokens=args.max_new_tokens,
                )
                texts += chunk
                tokens += n
            seconds = time.perf_counter() - start
            correct = score(texts, golds)
            # Per-problem solve rate shows whether groups would be mixed (useful for GRPO) or all-same.
            per_problem = [sum(correct[i : i + args.samples]) for i in range(0, len(correct), args.samples)]
            mixed = sum(0 < k < args.samples for k in per_problem) / len(per_problem)
            rows.append((name, temperature, sum(correct) / len(correct), mixed, tokens / len(texts), tokens / seconds))
            print(f"{name:>14} T={temperature}: acc {rows[-1][2]:.1%}, {seconds:.0f}s", flush=True)
            for text, gold, ok in list(zip(texts, golds, correct, strict=True))[: args.show]:
                print(f"--- gold {gold} {'OK' if ok else 'WRONG'}\n{text}")

    print("\n| candidate | temperature | accuracy | mixed groups | mean completion tokens | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, temperature, acc, mixed, length, speed in rows:
        print(f"| {name} | {temperature} | {acc:.1%} | {mixed:.0%} | {length:.0f} | {speed:.0f} |")


if __name__ == "__main__":
    main()
