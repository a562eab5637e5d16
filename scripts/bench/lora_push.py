"""Two ways to get a LoRA policy's new weights into vLLM after a step, timed on the same model in one run.

* **merged push** (what mgrpo_pl does): the base weights with the adapters folded in (``merged_weights``), pushed
  in place into the running engine with ``VLLMEngine.update_weights``, as for full fine-tuning;
* **vLLM LoRA**: the engine started with ``enable_lora``; each step saves the adapter (``save_pretrained``) and
  serves the next request with a new ``LoRARequest``, which loads it. Timed as the save plus the extra time of the
  first one-token request with the new adapter over one with an adapter already loaded.

Both engines then generate greedily from the same prompts (the texts must agree: the adapter is the same), and time
a rollout-sized sampled call: serving through LoRA adds the adapters' products to every decode step.

Examples:
    python -m scripts.bench.lora_push                 # the demo model, r=16, about 2 minutes on 2 CPU cores
    python -m scripts.bench.lora_push --model tiny --rank 8    # vLLM takes ranks 1, 8, 16, 32, ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scripts.bench.rollout import median_time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from mgrpo_pl.method import encode_prompt
    from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from mgrpo_pl.modeling.lora import add_lora, merged_weights
    from mgrpo_pl.rollout.engines.vllm import VLLMEngine
    from mgrpo_pl.rollout.types import SamplingConfig
    from mgrpo_pl.settings import LoraSettings

    path = str(resolve_model_path(args.model))
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path)
    peft_model = add_lora(policy, LoraSettings(r=args.rank, alpha=2.0 * args.rank))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is 0 at initialisation
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    questions = ("What is 7 + 5?", "What is 9 * 3?")
    prompts = [encode_prompt(tokenizer, q, "Put the final answer in \\boxed{}.") for q in questions]
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    # A layer-1 rollout's shape: 8 prompts x 4 samples, 64 tokens, sampled (min_tokens keeps the length fixed).
    rollout = prompts * 4
    sampled = SamplingConfig(max_new_tokens=64, temperature=1.0)

    engine = VLLMEngine(load_causal_lm(path), tokenizer, cpu_kv_cache_gib=0.25, max_model_len=1024)
    merged_s = []
    for _ in range(args.repeats):
        engine.update_weights(merged_weights(policy))
        merged_s.append(engine.last_push_s)
    merged_text = engine.generate(prompts, greedy).texts
    merged_gen, _ = median_time(lambda: engine.generate(rollout, sampled, n=4), args.repeats)
    engine.close()

    lora_engine = VLLMEngine(
        load_causal_lm(path),
        tokenizer,
        cpu_kv_cache_gib=0.25,
        max_model_len=1024,
        llm_kwargs={"enable_lora": True, "max_lora_rank": args.rank, "max_loras": 1},
    )
    llm = lora_engine.llm
    one_token = SamplingParams(max_tokens=1, temperature=0.0)
    request = [TokensPrompt(prompt_token_ids=prompts[0])]
    loads = []
    with tempfile.TemporaryDirectory(prefix="mgrpo_lora_push_") as tmp:
        for i in range(1, args.repeats + 2):
            start = time.perf_counter()
            folder = Path(tmp) / f"step{i}"
            peft_model.save_pretrained(folder)
            lora = LoRARequest(f"step{i}", i, str(folder))
            llm.generate(request, one_token, lora_request=lora, use_tqdm=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            llm.generate(request, one_token, lora_request=lora, use_tqdm=False)
            loads.append(first - (time.perf_counter() - start))
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(max_tokens=24, temperature=0.0),
            lora_request=lora,
            use_tqdm=False,
        )
        lora_text = [tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs]
        params = SamplingParams(n=4, max_tokens=sampled.max_new_tokens, temperature=sampled.temperature, seed=0)
        requests = [TokensPrompt(prompt_token_ids=p) for p in rollout]
        lora_gen, _ = median_time(
            lambda: llm.generate(requests, params, lora_request=lora, use_tqdm=False), args.repeats
        )
    lora_engine.close()

    merged, loaded = statistics.median(merged_s), statistics.median(loads[1:])  # the first load warms vLLM's path
    print(f"model {args.model}, LoRA r={args.rank}, {os.cpu_count()} CPUs")
    print(f"merged push into the running engine: {merged:.2f} s (median of {args.repeats})")
    print(f"vLLM LoRA: save + load of a new adapter: {loaded:.2f} s (median of {args.repeats})")
    print(f"rollout (8 prompts x 4 samples, <= 64 tokens): merged {merged_gen:.2f} s, vLLM LoRA {lora_gen:.2f} s")
    print(f"per step (push + rollout): merged {merged + merged_gen:.2f} s, vLLM LoRA {loaded + lora_gen:.2f} s")
    print(f"greedy texts agree: {merged_text == lora_text}")
    for a, b in zip(merged_text, lora_text):
        print(f"  merged {a!r}\n  lora   {b!r}")


if __name__ == "__main__":
    main()
