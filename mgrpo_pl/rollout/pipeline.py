"""The two-layer MGRPO rollout and the two-turn evaluation, engine-agnostic.

One training step (paper Sec. 4, Eq. 1-6):

1. Layer 1: G samples per problem -> rewards -> group-relative advantages.
2. Layer 2: every layer-1 sample becomes a correction query ``q ⊕ o ⊕ p_guide`` continuing the assistant turn; one
   probe correction per query is generated and verified; the verified queries (G' per problem) are kept and
   H samples per kept query form one GRPO group each. Queries whose probe fails are discarded.
3. Everything is returned as one ``RolloutBatch``: layer-1 sequences first, then layer-2 ones.

The layer-1 sample / probe pairs also give the step's turn-1 vs turn-2 correctness, from which the module logs
Acc@t1, Acc@t2, i->c and c->i during training.

Turn 2's answer is read one way everywhere (``turn2_scoring``): by default it is the answer the model ends with, the
correction's final answer when the correction states one and turn 1's otherwise, so the layer-2 reward, the probes'
selection and Acc@t2 at evaluation all judge the same thing. Evaluation draws from no stream training uses.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mgrpo_pl.algo.advantages import group_advantages
from mgrpo_pl.algo.correction import (
    GuidePool,
    Layer2Plan,
    build_correction_query,
    cap_per_problem,
    select_verified,
    turn2_texts,
)
from mgrpo_pl.rewards.reading import FinalAnswer, read_final_answer
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engine import GenerationEngine
from mgrpo_pl.rollout.generation import generate, split_first, take
from mgrpo_pl.rollout.types import EvalBatch, Generation, RolloutBatch

if TYPE_CHECKING:
    from mgrpo_pl.data.problems import Problem
    from mgrpo_pl.rewards.base import RewardFunction


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, instruction: str = "", system_prompt: str | None = None
) -> list[int]:
    """Token ids of the problem as a user turn followed by the assistant's generation prompt.

    Tokenizers without a chat template (base models) get a plain ``Question: ... Answer:`` frame.
    """
    content = f"{question}\n{instruction}" if instruction else question
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return tokenizer(f"{prefix}Question: {content}\nAnswer:", add_special_tokens=True)["input_ids"]


class MGRPORollout:
    """Produces training rollouts and evaluation results from problems, given an engine and a reward.

    Args:
        config: What to generate and how to score it.
        tokenizer: The policy's tokenizer.
        reward: Any ``RewardFunction``: ``reward(completions, answers) -> Tensor[N]`` in [0, 1].
    """

    def __init__(self, config: RolloutConfig, tokenizer: PreTrainedTokenizerBase, reward: RewardFunction) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.reward = reward
        # What counts as a stated answer is the reward's call, so that turn 2 is read as the reward reads answers.
        self.final_answer = getattr(reward, "final_answer", None) or read_final_answer
        # The config allows an empty pool only when nothing draws from it (layer 2 off, a fixed eval_guide).
        self.guides = GuidePool(config.guide_phrases or [config.eval_guide or ""])
        self.generator = torch.Generator().manual_seed(config.seed)
        # One table of phrases: the training pool, then the fixed evaluation phrase when one is set.
        self.phrases = list(self.guides.phrases) + ([config.eval_guide] if config.eval_guide is not None else [])
        self.eval_guide_index = len(self.guides) if config.eval_guide is not None else None
        sep = config.guide_separator
        self.guide_ids = [tokenizer(sep + p, add_special_tokens=False)["input_ids"] for p in self.phrases]
        self.think_ids = (
            tokenizer(config.think_close, add_special_tokens=False)["input_ids"] if config.think_close else []
        )

    # -- shared pieces ------------------------------------------------------------------------------------------
    def encode(self, problems: Sequence[Problem]) -> list[list[int]]:
        c = self.config
        return [encode_prompt(self.tokenizer, p.question, c.instruction, c.system_prompt) for p in problems]

    @staticmethod
    def _check_context(
        engine: GenerationEngine, queries: Sequence[Sequence[int]], max_new_tokens: int, names: Sequence[str], flag: str
    ) -> None:
        """Fail before generating when a query plus its completion budget cannot fit the model's context."""
        limit = engine.max_context
        if limit is None:
            return
        for query, name in zip(queries, names):
            if len(query) + max_new_tokens > limit:
                raise ValueError(
                    f"{name}: {len(query)} prompt tokens + {flag}={max_new_tokens} exceed the model's context of "
                    f"{limit} tokens; shorten the problem, lower {flag}, or filter long problems out of the data"
                )

    def _score(
        self, texts: list[str], answers: list[str], stats: dict[str, float] | None = None
    ) -> tuple[Tensor, float]:
        start = time.perf_counter()
        rewards = self.reward(texts, answers).float().cpu() if texts else torch.zeros(0)
        if stats is not None and texts and hasattr(self.reward, "stats"):
            # Items past their time limit score 0: counted so that a run where many do is visible in TensorBoard.
            stats["reward/timeouts"] = stats.get("reward/timeouts", 0.0) + self.reward.stats()["last_call_timeouts"]
        if rewards.shape != (len(texts),):
            raise ValueError(f"the reward returned shape {tuple(rewards.shape)} for {len(texts)} completions")
        if not torch.isfinite(rewards).all():
            bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
            raise ValueError(
                f"the reward returned non-finite values for completions {bad[:10]}: {texts[bad[0]]!r:.200}"
            )
        return rewards, time.perf_counter() - start

    def _queries(
        self,
        engine: GenerationEngine,
        prompts: list[list[int]],
        first: Generation,
        per_prompt: int,
        guide: int | None,
        guides: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[list[int]], list[int]]:
        """Correction queries for every layer-1 sample, with the guide index used for each (``guides`` when given,
        else ``guide`` for all, else drawn from the pool with ``generator``, training's guide generator by default)."""
        n = len(first)
        if guides is None:
            guides = [guide] * n if guide is not None else self.guides.sample(n, generator or self.generator)
        queries = [
            build_correction_query(
                prompts[i // per_prompt], first.token_ids[i], self.guide_ids[g], engine.end_ids, self.think_ids
            )
            for i, g in enumerate(guides)
        ]
        return queries, guides

    def _turn2_texts(
        self, first_texts: list[str], guides: list[int], second: Generation
    ) -> tuple[list[str], list[bool]]:
        """The texts turn 2 is scored on under ``turn2_scoring``, and which keep turn 1's answer."""
        return turn2_texts(
            first_texts,
            [self.phrases[g] for g in guides],
            second.texts,
            self.config.turn2_scoring,
            lambda text: self.final_answer(text) is not None,
            self.config.guide_separator,
        )

    def _cap(self, verified: Tensor, problems: Sequence[Problem], step: int) -> Tensor:
        """``verified`` cut to ``max_kept_per_problem`` queries per problem (all of them when unset)."""
        cap, G = self.config.max_kept_per_problem, self.config.num_generations
        if cap is None or cap >= G:
            return verified
        generators: list[torch.Generator] | torch.Generator = self.generator
        if self.config.seed_per_problem:
            generators = [torch.Generator().manual_seed(self._problem_seed(step, p, "cap")) for p in problems]
        return cap_per_problem(verified, G, cap, generators)

    def _problem_seed(self, step: int, problem: Problem, tag: str) -> int:
        return zlib.crc32(f"{self.config.seed}/{step}/{problem.id}/{tag}".encode())

    # -- training ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, engine: GenerationEngine, problems: Sequence[Problem], step: int = 0) -> RolloutBatch:
        """The two-layer rollout of one training step; ``step`` (the global step) keys per-problem seeding."""
        # Layer 2's queries start with layer 1's sequences, and its groups with the probes' queries.
        with engine.reuse_prefixes() if self.config.layer2 else nullcontext():
            return self._rollout(engine, problems, step)

    def _rollout(self, engine: GenerationEngine, problems: Sequence[Problem], step: int) -> RolloutBatch:
        c = self.config
        B, G, H = len(problems), c.num_generations, c.num_corrections
        timings = {"generate": 0.0, "reward": 0.0}
        prompts = self.encode(problems)
        seeds = {
            tag: [self._problem_seed(step, p, tag) for p in problems] if c.seed_per_problem else None
            for tag in ("layer1", "probe", "layer2")
        }
        answers = [p.answer for p in problems for _ in range(G)]

        labels = [f"problem {p.id!r} ({p.source or 'no source'})" for p in problems]
        self._check_context(
            engine, prompts, c.sampling.max_new_tokens, labels, "--data.rollout.sampling.max_new_tokens"
        )
        tick = time.perf_counter()
        first = generate(engine, prompts, c.sampling, G, list(range(B)), seeds["layer1"])
        timings["generate"] += time.perf_counter() - tick
        stats: dict[str, float] = {}
        r1, dt = self._score(first.texts, answers, stats)
        timings["reward"] += dt
        adv1 = group_advantages(r1.view(B, G), c.advantage_scaling, c.advantage_eps).flatten()
        correct_t1 = r1 >= c.correct_threshold

        seqs = [torch.tensor(prompts[i // G] + first.token_ids[i]) for i in range(B * G)]
        prompt_lens = [len(prompts[i // G]) for i in range(B * G)]
        advantages, rewards, layers = [adv1], [r1], [1] * (B * G)
        truncated = [not f for f in first.finished]
        logprobs = [torch.tensor(lp) for lp in first.logprobs] if first.logprobs is not None else None
        correct_t2 = torch.zeros(0, dtype=torch.bool)
        stats.update({"reward/layer1": float(r1.mean()), "tokens/layer1": float(first.num_tokens)})
        samples = [
            {
                "question": problems[0].question,
                "answer": problems[0].answer,
                "completion": first.texts[j],
                "reward": float(r1[j]),
            }
            for j in range(min(2, G))
        ]

        if c.layer2:
            drawn = None
            if c.seed_per_problem:
                generators = [torch.Generator().manual_seed(self._problem_seed(step, p, "guide")) for p in problems]
                drawn = [g for gen in generators for g in self.guides.sample(G, gen)]
            queries, guides = self._queries(engine, prompts, first, G, None, drawn)
            self._check_context(
                engine,
                queries,
                c.layer2_sampling.max_new_tokens,
                [f"layer-2 query of {labels[i // G]}" for i in range(len(queries))],
                "the layer-2 max_new_tokens (--data.rollout.correction_sampling or sampling)",
            )
            tick = time.perf_counter()
            owners = [i // G for i in range(B * G)]
            # joint: every query's probe and its group's fresh samples come from one engine call; the fresh
            # samples of queries whose probe fails are then dropped.
            per_query = 1 + c.fresh_corrections if c.joint_layer2 else 1
            drawn_l2 = generate(engine, queries, c.layer2_sampling, per_query, owners, seeds["probe"])
            probe, pregenerated = split_first(drawn_l2, per_query)
            timings["generate"] += time.perf_counter() - tick
            probe_texts, probe_kept_t1 = self._turn2_texts(first.texts, guides, probe)
            rp, dt = self._score(probe_texts, answers, stats)
            timings["reward"] += dt
            correct_t2 = rp >= c.correct_threshold
            verified = select_verified(rp, c.correct_threshold)
            plan = Layer2Plan.from_selection(self._cap(verified, problems, step), G)
            K = len(plan)
            stats.update(
                {
                    "layer2/probe_accuracy": float(correct_t2.float().mean()),
                    "layer2/verified_queries": float(verified.numel()),
                    "layer2/kept_queries": float(K),
                    "layer2/kept_per_problem": K / B,
                    # corrections that state no answer of their own, so turn 2 keeps turn 1's
                    "layer2/probe_kept_turn1": float(sum(probe_kept_t1)) / max(1, len(probe_kept_t1)),
                    "tokens/probe": float(probe.num_tokens),
                    # joint: every query's group was generated, kept or not
                    "tokens/layer2_drawn": float(pregenerated.num_tokens) if c.joint_layer2 else 0.0,
                }
            )
            for j in range(min(2, G)):
                samples[j].update(correction=probe.texts[j], correction_reward=float(rp[j]))
            if K:
                kept = plan.query_index.tolist()
                ready = pregenerated if c.joint_layer2 else None
                group = self._layer2_groups(
                    engine,
                    queries,
                    kept,
                    probe,
                    first.texts,
                    guides,
                    answers,
                    timings,
                    G,
                    seeds["layer2"],
                    ready,
                    stats,
                )
                tokens2, texts2, finished2, r2, lp2 = group
                adv2 = group_advantages(r2.view(K, H), c.advantage_scaling, c.advantage_eps).flatten()
                for row in range(K * H):
                    query = queries[kept[row // H]]
                    seqs.append(torch.tensor(query + tokens2[row]))
                    prompt_lens.append(len(query))
                truncated += [not f for f in finished2]
                advantages.append(adv2)
                rewards.append(r2)
                layers += [2] * (K * H)
                if logprobs is not None:
                    logprobs += [torch.tensor(lp) for lp in lp2] if lp2 is not None else []
                    if lp2 is None:
                        logprobs = None
                stats["reward/layer2"] = float(r2.mean())
                stats["tokens/layer2"] = float(sum(len(t) for t in tokens2))
                if not c.joint_layer2:
                    # A reused probe was drawn, and counted, as a probe already.
                    reused = sum(len(probe.token_ids[k]) for k in kept) if c.reuse_probe else 0
                    stats["tokens/layer2_drawn"] = stats["tokens/layer2"] - reused
            elif getattr(engine, "lockstep", False) and not c.joint_layer2:
                # This rank kept nothing, but the others generate: join their collectives with the same calls.
                generate(engine, [], c.layer2_sampling, 1, [], seeds["layer2"])

        generated = stats["tokens/layer1"] + stats.get("tokens/probe", 0.0) + stats.get("tokens/layer2_drawn", 0.0)
        stats.update(
            {
                "tokens/generated": generated,
                "time/generate_s": timings["generate"],
                "time/reward_s": timings["reward"],
                "rollout/truncated_frac": sum(truncated) / len(truncated),
                "rollout/completion_len": stats["tokens/layer1"] / (B * G),
            }
        )
        return RolloutBatch(
            sequences=seqs,
            prompt_lengths=torch.tensor(prompt_lens, dtype=torch.long),
            advantages=torch.cat(advantages).float(),
            layer=torch.tensor(layers, dtype=torch.long),
            truncated=torch.tensor(truncated, dtype=torch.bool),
            rewards=torch.cat(rewards).float(),
            num_problems=B,
            correct_t1=correct_t1,
            correct_t2=correct_t2,
            engine_logprobs=logprobs,
            stats=stats,
            samples=samples,
            # An engine that generates with the policy module itself is on-policy by construction; fingerprinting
            # every weight for it would cost a pass over the whole model per step.
            weights_checksum=None if getattr(engine, "shared", False) else engine.weights_checksum(),
        )

    def _layer2_groups(
        self,
        engine: GenerationEngine,
        queries: list[list[int]],
        kept: list[int],
        probe: Generation,
        first_texts: list[str],
        guides: list[int],
        answers: list[str],
        timings: dict[str, float],
        group_size: int,
        seeds: list[int] | None = None,
        pregenerated: Generation | None = None,
        stats: dict[str, float] | None = None,
    ) -> tuple[list[list[int]], list[str], list[bool], Tensor, list[list[float]] | None]:
        """H samples per kept query (the verified probe first when ``reuse_probe``), with their rewards; the fresh
        ones are generated now, or taken from ``pregenerated`` (``fresh`` rows per query, for every query)."""
        c = self.config
        fresh = c.fresh_corrections
        if pregenerated is not None:
            more = take(pregenerated, [k * fresh + h for k in kept for h in range(fresh)])
        else:
            tick = time.perf_counter()
            owners = [k // group_size for k in kept]
            more = generate(engine, [queries[k] for k in kept], c.layer2_sampling, fresh, owners, seeds)
            timings["generate"] += time.perf_counter() - tick
        tokens, texts, finished, sources = [], [], [], []
        logprobs: list[list[float]] | None = [] if more.logprobs is not None and probe.logprobs is not None else None
        for j, k in enumerate(kept):
            rows = [(probe, k)] if c.reuse_probe else []
            rows += [(more, j * fresh + h) for h in range(fresh)]
            for gen, idx in rows:
                tokens.append(gen.token_ids[idx])
                texts.append(gen.texts[idx])
                finished.append(gen.finished[idx])
                sources.append(k)
                if logprobs is not None:
                    logprobs.append(gen.logprobs[idx])  # type: ignore[index]
        scored_texts, _ = self._turn2_texts(
            [first_texts[k] for k in sources], [guides[k] for k in sources], Generation(tokens, texts, finished)
        )
        rewards, dt = self._score(scored_texts, [answers[k] for k in sources], stats)
        timings["reward"] += dt
        return tokens, texts, finished, rewards, logprobs

    def _new_turn_query(self, problem: Problem, answer: str) -> list[int]:
        """The conversation user(q), assistant(o), user(eval_guide), ready for the assistant's second turn."""
        c = self.config
        if not self.tokenizer.chat_template:
            raise ValueError("--data.rollout.eval_turn2=new_turn needs a tokenizer with a chat template")
        messages = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        question = f"{problem.question}\n{c.instruction}" if c.instruction else problem.question
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": c.eval_guide},
        ]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, engine: GenerationEngine, problems: Sequence[Problem]) -> EvalBatch:
        """Turn 1 answers each problem; turn 2 continues ``q ⊕ o ⊕ guide`` (or asks in a new user turn); both turns
        are scored."""
        # Evaluation samples, and draws any guide phrase, from its own seeded streams: results do not depend on when
        # in training it runs, and it leaves training's RNG and guide generator untouched (exact resume).
        seed = self.config.seed + zlib.crc32(problems[0].id.encode()) if problems else self.config.seed
        with torch.random.fork_rng(), engine.reuse_prefixes():  # turn 2 starts with turn 1's sequences
            torch.manual_seed(seed)
            return self._evaluate(engine, problems, torch.Generator().manual_seed(seed))

    def _evaluate(self, engine: GenerationEngine, problems: Sequence[Problem], generator: torch.Generator) -> EvalBatch:
        c = self.config
        k = c.eval_samples
        prompts = self.encode(problems)
        answers = [p.answer for p in problems for _ in range(k)]
        flag = "--data.rollout.eval_sampling.max_new_tokens"
        labels = [f"problem {p.id!r} ({p.source or 'no source'})" for p in problems]
        self._check_context(engine, prompts, c.eval_sampling.max_new_tokens, labels, flag)
        first = engine.generate(prompts, c.eval_sampling, n=k)
        r1, _ = self._score(first.texts, answers)
        if c.eval_turn2 == "new_turn":
            queries = [self._new_turn_query(problems[i // k], first.texts[i]) for i in range(len(first))]
            guides = [self.eval_guide_index] * len(first)
        else:
            queries, guides = self._queries(engine, prompts, first, k, self.eval_guide_index, generator=generator)
        turn2_labels = [f"turn-2 query of {labels[i // k]}" for i in range(len(queries))]
        self._check_context(engine, queries, c.eval_sampling.max_new_tokens, turn2_labels, flag)
        second = engine.generate(queries, c.eval_sampling, n=1)
        scored, kept_t1 = self._turn2_texts(first.texts, guides, second)
        r2, _ = self._score(scored, answers)
        ok1, ok2 = r1 >= c.correct_threshold, r2 >= c.correct_threshold
        read1 = [self.final_answer(t) for t in first.texts]
        # The answer turn 2 was judged on, for auditing a transition (the whole text for the ``full`` reading).
        read2 = [read1[i] if kept_t1[i] else self.final_answer(scored[i]) for i in range(len(scored))]
        records = [
            {
                "problem_id": problems[i // k].id,
                "sample": i % k,
                "question": problems[i // k].question,
                "answer": problems[i // k].answer,
                "turn1": first.texts[i],
                "turn2": second.texts[i],
                "guide": self.phrases[guides[i]],
                "answer_t1": _answer_text(read1[i]),
                "answer_t2": _answer_text(read2[i]),
                "answer_t2_from": "turn1" if kept_t1[i] else "turn2",
                "turn2_scoring": c.turn2_scoring,
                # False: cut at max_new_tokens (a truncated correction is one of the audit's categories)
                "finished_t1": bool(first.finished[i]),
                "finished_t2": bool(second.finished[i]),
                "correct_t1": bool(ok1[i]),
                "correct_t2": bool(ok2[i]),
            }
            for i in range(len(answers))
        ]
        return EvalBatch(
            problem_ids=[problems[i // k].id for i in range(len(answers))],
            correct_t1=ok1,
            correct_t2=ok2,
            records=records,
        )


def _answer_text(answer: FinalAnswer | None) -> str | None:
    """A read answer as the per-problem records show it: its text, marked when it is an unevaluated expression."""
    if answer is None:
        return None
    return f"{answer.text} (unevaluated)" if answer.unevaluated else answer.text
