"""One MGRPO training step's rollout, as layers (paper Sec. 4, Eq. 1-6).

``MGRPORollout._rollout`` is the whole method on one screen:

1. **Layer 1** (``_layer1``): G samples per problem, scored by the reward, group-relative advantages.
2. **Correction layer** (``_probe`` then ``_corrections``), built from layer 1's outputs: every layer-1 sample
   becomes a correction query ``q ⊕ o ⊕ p_guide`` continuing the assistant turn; one probe correction per query is
   generated and verified; the verified queries (G' per problem, at most ``max_kept_per_problem``) are kept, and H
   samples per kept query form one GRPO group each. Queries whose probe fails are discarded.
3. The layers' rows become one ``RolloutBatch`` (layer 1 first); the loss is their weighted sum (``method.loss``).

The layer-1 sample / probe pairs also give the step's turn-1 vs turn-2 correctness, from which the module logs
Acc@t1, Acc@t2, i->c and c->i during training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from mgrpo_pl.algo.advantages import group_advantages
from mgrpo_pl.algo.correction import Layer2Plan, select_verified
from mgrpo_pl.method.evaluation import TwoTurnEvaluator
from mgrpo_pl.method.layers import LayerRows, StepRecord, to_batch
from mgrpo_pl.rollout.engines.base import GenerationEngine
from mgrpo_pl.rollout.generation import generate, split_first, take
from mgrpo_pl.rollout.types import Generation, RolloutBatch

if TYPE_CHECKING:
    from mgrpo_pl.data.loaders import Problem

T = TypeVar("T")


@dataclass
class _Step:
    """The inputs every layer of one step reads, and the clocks and statistics they add to."""

    problems: Sequence[Problem]
    step: int
    prompts: list[list[int]]
    answers: list[str]  # one per layer-1 sample
    labels: list[str]
    seeds: dict[str, list[int] | None]
    timings: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "reward": 0.0})


@dataclass
class _Probes:
    """A correction layer's first round: one query and one verified-or-not probe per previous-layer sample."""

    queries: list[list[int]]
    guides: list[int]
    probe: Generation
    pregenerated: Generation  # with ``joint_layer2``: every query's fresh samples, drawn with its probe
    correct: Tensor
    plan: Layer2Plan


class MGRPORollout(TwoTurnEvaluator):
    """Produces training rollouts (``rollout``) and evaluation results (``evaluate``) from problems.

    Args:
        config: What to generate and how to score it.
        tokenizer: The policy's tokenizer.
        reward: Any ``RewardFunction``: ``reward(completions, answers) -> Tensor[N]`` in [0, 1].
    """

    @torch.no_grad()
    def rollout(self, engine: GenerationEngine, problems: Sequence[Problem], step: int = 0) -> RolloutBatch:
        """The rollout of one training step; ``step`` (the global step) keys per-problem seeding."""
        # The correction layer's queries start with layer 1's sequences, and its groups with the probes' queries.
        with engine.reuse_prefixes() if self.config.layer2 else nullcontext():
            return self._rollout(engine, problems, step)

    def _rollout(self, engine: GenerationEngine, problems: Sequence[Problem], step: int) -> RolloutBatch:
        s = self._start(problems, step)
        layer1, first, record = self._layer1(engine, s)
        layers = [layer1]
        if self.config.layer2:
            probes = self._probe(engine, s, first, record)
            record.correct_t2 = probes.correct
            if len(probes.plan):
                layers.append(self._corrections(engine, s, first, probes, record))
            elif engine.lockstep and not self.config.joint_layer2:
                # This rank kept nothing, but the others generate: join their collectives with the same calls.
                generate(engine, [], self.config.layer2_sampling, 1, [], s.seeds["layer2"])
        self._finish(s, layers, record)
        # An engine that generates with the policy module itself is on-policy by construction; fingerprinting every
        # weight for it would cost a pass over the whole model per step.
        checksum = None if engine.shared else engine.weights_checksum()
        return to_batch(layers, record, len(problems), checksum)

    # -- the layers ----------------------------------------------------------------------------------------------
    def _start(self, problems: Sequence[Problem], step: int) -> _Step:
        c = self.config
        seeds = {
            tag: [self._problem_seed(step, p, tag) for p in problems] if c.seed_per_problem else None
            for tag in ("layer1", "probe", "layer2")
        }
        return _Step(
            problems=problems,
            step=step,
            prompts=self.encode(problems),
            answers=[p.answer for p in problems for _ in range(c.num_generations)],
            labels=[f"problem {p.id!r} ({p.source or 'no source'})" for p in problems],
            seeds=seeds,
        )

    def _layer1(self, engine: GenerationEngine, s: _Step) -> tuple[LayerRows, Generation, StepRecord]:
        """G samples per problem, their rewards and group advantages."""
        c = self.config
        B, G = len(s.problems), c.num_generations
        flag = "--data.rollout.sampling.max_new_tokens"
        self._check_context(engine, s.prompts, c.sampling.max_new_tokens, s.labels, flag)
        first = self._timed(
            s, "generate", generate, engine, s.prompts, c.sampling, G, list(range(B)), s.seeds["layer1"]
        )
        stats: dict[str, float] = {}
        r1 = self._timed(s, "reward", self._score, first.texts, s.answers, stats)
        adv1 = group_advantages(r1.view(B, G), c.advantage_scaling, c.advantage_eps).flatten()
        stats.update({"reward/layer1": float(r1.mean()), "tokens/layer1": float(first.num_tokens)})
        p = s.problems[0]
        samples = [
            {"question": p.question, "answer": p.answer, "completion": first.texts[j], "reward": float(r1[j])}
            for j in range(min(2, G))
        ]
        record = StepRecord(correct_t1=r1 >= c.correct_threshold, stats=stats, samples=samples)
        queries = [s.prompts[i // G] for i in range(B * G)]
        rows = LayerRows(1, queries, first.token_ids, first.finished, r1, adv1, first.logprobs)
        return rows, first, record

    def _probe(self, engine: GenerationEngine, s: _Step, first: Generation, record: StepRecord) -> _Probes:
        """A correction query per previous-layer sample, one probe correction each, verified; the kept queries."""
        c = self.config
        B, G = len(s.problems), c.num_generations
        drawn = None
        if c.seed_per_problem:
            gens = [torch.Generator().manual_seed(self._problem_seed(s.step, p, "guide")) for p in s.problems]
            drawn = [g for gen in gens for g in self.guides.sample(G, gen)]
        queries, guides = self._queries(engine, s.prompts, first, G, None, drawn)
        labels = [f"layer-2 query of {s.labels[i // G]}" for i in range(len(queries))]
        flag = "the layer-2 max_new_tokens (--data.rollout.correction_sampling or sampling)"
        self._check_context(engine, queries, c.layer2_sampling.max_new_tokens, labels, flag)
        owners = [i // G for i in range(B * G)]
        # joint: every query's probe and its group's fresh samples come from one engine call; the fresh samples of
        # queries whose probe fails are then dropped.
        per_query = 1 + c.fresh_corrections if c.joint_layer2 else 1
        args = (engine, queries, c.layer2_sampling, per_query, owners, s.seeds["probe"])
        probe, pregenerated = split_first(self._timed(s, "generate", generate, *args), per_query)
        probe_texts, probe_kept_t1 = self._turn2_texts(first.texts, guides, probe)
        rp = self._timed(s, "reward", self._score, probe_texts, s.answers, record.stats)
        verified = select_verified(rp, c.correct_threshold)
        plan = Layer2Plan.from_selection(self._cap(verified, s.problems, s.step), G)
        correct = rp >= c.correct_threshold
        record.stats.update(
            {
                "layer2/probe_accuracy": float(correct.float().mean()),
                "layer2/verified_queries": float(verified.numel()),
                "layer2/kept_queries": float(len(plan)),
                "layer2/kept_per_problem": len(plan) / B,
                # corrections that state no answer of their own, so turn 2 keeps turn 1's
                "layer2/probe_kept_turn1": float(sum(probe_kept_t1)) / max(1, len(probe_kept_t1)),
                "tokens/probe": float(probe.num_tokens),
                # joint: every query's group was generated, kept or not
                "tokens/layer2_drawn": float(pregenerated.num_tokens) if c.joint_layer2 else 0.0,
            }
        )
        for j in range(min(2, G)):
            record.samples[j].update(correction=probe.texts[j], correction_reward=float(rp[j]))
        return _Probes(queries, guides, probe, pregenerated, correct, plan)

    def _corrections(
        self, engine: GenerationEngine, s: _Step, first: Generation, probes: _Probes, record: StepRecord
    ) -> LayerRows:
        """H samples per kept query (the verified probe first when ``reuse_probe``), scored; one GRPO group each."""
        c = self.config
        K, H, fresh = len(probes.plan), c.num_corrections, c.fresh_corrections
        kept = probes.plan.query_index.tolist()
        if c.joint_layer2:
            more = take(probes.pregenerated, [k * fresh + h for k in kept for h in range(fresh)])
        else:
            owners = [k // c.num_generations for k in kept]
            args = (engine, [probes.queries[k] for k in kept], c.layer2_sampling, fresh, owners, s.seeds["layer2"])
            more = self._timed(s, "generate", generate, *args)
        rows: list[tuple[int, Generation, int]] = []  # (kept query, generation, its row there), group by group
        for j, k in enumerate(kept):
            rows += [(k, probes.probe, k)] if c.reuse_probe else []
            rows += [(k, more, j * fresh + h) for h in range(fresh)]
        group = Generation(
            [gen.token_ids[i] for _, gen, i in rows],
            [gen.texts[i] for _, gen, i in rows],
            [gen.finished[i] for _, gen, i in rows],
        )
        logprobs = None
        if more.logprobs is not None and probes.probe.logprobs is not None:
            logprobs = [gen.logprobs[i] for _, gen, i in rows]  # type: ignore[index]
        sources = [k for k, _, _ in rows]
        scored, _ = self._turn2_texts([first.texts[k] for k in sources], [probes.guides[k] for k in sources], group)
        r2 = self._timed(s, "reward", self._score, scored, [s.answers[k] for k in sources], record.stats)
        adv2 = group_advantages(r2.view(K, H), c.advantage_scaling, c.advantage_eps).flatten()
        stats = record.stats
        stats["reward/layer2"] = float(r2.mean())
        stats["tokens/layer2"] = float(sum(len(t) for t in group.token_ids))
        if not c.joint_layer2:
            # A reused probe was drawn, and counted, as a probe already.
            reused = sum(len(probes.probe.token_ids[k]) for k in kept) if c.reuse_probe else 0
            stats["tokens/layer2_drawn"] = stats["tokens/layer2"] - reused
        queries = [probes.queries[k] for k in sources]
        return LayerRows(2, queries, group.token_ids, group.finished, r2, adv2, logprobs)

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    @staticmethod
    def _timed(s: _Step, clock: str, fn: Callable[..., T], *args: Any) -> T:
        tick = time.perf_counter()
        try:
            return fn(*args)
        finally:
            s.timings[clock] += time.perf_counter() - tick

    def _finish(self, s: _Step, layers: list[LayerRows], record: StepRecord) -> None:
        stats = record.stats
        generated = stats["tokens/layer1"] + stats.get("tokens/probe", 0.0) + stats.get("tokens/layer2_drawn", 0.0)
        finished = [f for rows in layers for f in rows.finished]
        stats.update(
            {
                "tokens/generated": generated,
                "time/generate_s": s.timings["generate"],
                "time/reward_s": s.timings["reward"],
                "rollout/truncated_frac": sum(not f for f in finished) / len(finished),
                "rollout/completion_len": stats["tokens/layer1"] / len(layers[0].finished),
            }
        )
