"""One MGRPO training step's rollout, as layers (paper Sec. 4, Eq. 1-6).

``MGRPORollout._rollout`` is the whole method on one screen:

1. **Layer 1** (``_layer1``): G samples per problem, scored by the reward, group-relative advantages.
2. **Correction layer k = 2..N** (``_probe`` then ``_corrections``), built from layer k-1's rows: every row becomes
   a correction query ``query ⊕ completion ⊕ p_guide`` continuing the assistant turn; one probe correction per query
   is generated and verified; the verified queries (at most ``max_kept_per_problem`` per problem) are kept, and H
   samples per kept query form one GRPO group each. Queries whose probe fails are discarded. Layer 2 (the paper's)
   corrects layer-1 samples; layer 3 corrects layer-2 samples, and so on (``num_layers``).
3. The layers' rows become one ``RolloutBatch`` (layer 1 first); the loss is their weighted sum (``method.loss``).

The layer-1 sample / layer-2 probe pairs also give the step's turn-1 vs turn-2 correctness, from which the module
logs Acc@t1, Acc@t2, i->c and c->i during training.
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
from mgrpo_pl.algo.correction import CorrectionPlan, select_verified
from mgrpo_pl.method.evaluation import TwoTurnEvaluator
from mgrpo_pl.method.layers import LayerRows, StepRecord, to_batch
from mgrpo_pl.rollout.config import CorrectionLayer
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
    labels: list[str]
    seeds: dict[str, list[int] | None]
    timings: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "reward": 0.0})

    def answers(self, owners: Sequence[int]) -> list[str]:
        """The gold answer of each row's problem."""
        return [self.problems[o].answer for o in owners]


@dataclass
class _Probes:
    """A correction layer's first round: one query and one verified-or-not probe per previous-layer row."""

    queries: list[list[int]]
    guides: list[int]
    probe: Generation
    pregenerated: Generation  # with ``joint_layer2``: every query's fresh samples, drawn with its probe
    correct: Tensor
    plan: CorrectionPlan


def _tag(base: str, layer: int) -> str:
    """The name of a correction layer's statistic or seed: layer 2 keeps the names it had before deeper layers."""
    return base if layer == 2 else f"{base}{layer}"


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
        # A correction layer's queries start with the previous layer's sequences, and its groups with the probes'.
        with engine.reuse_prefixes() if self.config.depth >= 2 else nullcontext():
            return self._rollout(engine, problems, step)

    def _rollout(self, engine: GenerationEngine, problems: Sequence[Problem], step: int) -> RolloutBatch:
        s = self._start(problems, step)
        tick = time.perf_counter()
        previous, record = self._layer1(engine, s)
        record.stats["time/layer1_s"] = time.perf_counter() - tick
        layers = [previous]
        for layer in self.config.correction_layers:
            tick = time.perf_counter()
            probes = self._probe(engine, s, layer, previous, record)
            if layer.layer == 2:
                record.correct_t2 = probes.correct
            if len(probes.plan) or engine.lockstep:
                # A lockstep engine (a sharded policy) makes every later call even when this rank kept nothing: the
                # other ranks generate, and their collectives need this rank's.
                previous = self._corrections(engine, s, layer, previous, probes, record)
            record.stats[f"time/layer{layer.layer}_s"] = time.perf_counter() - tick
            if len(probes.plan):
                layers.append(previous)
            elif not engine.lockstep:
                break  # nothing kept: no deeper layer either
        self._finish(s, layers, record)
        # An engine that generates with the policy module itself is on-policy by construction; fingerprinting every
        # weight for it would cost a pass over the whole model per step.
        checksum = None if engine.shared else engine.weights_checksum()
        return to_batch(layers, record, len(problems), checksum, self.config.depth)

    # -- the layers ----------------------------------------------------------------------------------------------
    def _start(self, problems: Sequence[Problem], step: int) -> _Step:
        c = self.config
        tags = ["layer1"] + [t for k in range(2, c.depth + 1) for t in (_tag("probe", k), f"layer{k}")]
        seeds = {
            tag: [self._problem_seed(step, p, tag) for p in problems] if c.seed_per_problem else None for tag in tags
        }
        return _Step(
            problems=problems,
            step=step,
            prompts=self.encode(problems),
            labels=[f"problem {p.id!r} ({p.source or 'no source'})" for p in problems],
            seeds=seeds,
        )

    def _layer1(self, engine: GenerationEngine, s: _Step) -> tuple[LayerRows, StepRecord]:
        """G samples per problem, their rewards and group advantages."""
        c = self.config
        B, G = len(s.problems), c.num_generations
        flag = "--data.rollout.sampling.max_new_tokens"
        self._check_context(engine, s.prompts, c.sampling.max_new_tokens, s.labels, flag)
        first = self._timed(
            s, "generate", generate, engine, s.prompts, c.sampling, G, list(range(B)), s.seeds["layer1"]
        )
        owners = [i // G for i in range(B * G)]
        stats: dict[str, float] = {}
        r1 = self._timed(s, "reward", self._score, first.texts, s.answers(owners), stats)
        adv1 = group_advantages(r1.view(B, G), c.advantage_scaling, c.advantage_eps).flatten()
        stats.update({"reward/layer1": float(r1.mean()), "tokens/layer1": float(first.num_tokens)})
        p = s.problems[0]
        samples = [
            {"question": p.question, "answer": p.answer, "completion": first.texts[j], "reward": float(r1[j])}
            for j in range(min(2, G))
        ]
        record = StepRecord(correct_t1=r1 >= c.correct_threshold, stats=stats, samples=samples)
        queries = [s.prompts[o] for o in owners]
        rows = LayerRows(1, queries, first.token_ids, first.finished, r1, adv1, first.logprobs, owners, first.texts)
        return rows, record

    def _probe(
        self, engine: GenerationEngine, s: _Step, layer: CorrectionLayer, previous: LayerRows, record: StepRecord
    ) -> _Probes:
        """A correction query per previous-layer row, one probe correction each, verified; the kept queries."""
        c, k = self.config, layer.layer
        if c.seed_per_problem:  # each problem's phrases from its own generator, one per row of that problem
            drawn = []
            for i, problem in enumerate(s.problems):
                gen = torch.Generator().manual_seed(self._problem_seed(s.step, problem, _tag("guide", k)))
                drawn += self.draw_guides(k, previous.owners.count(i), gen)
        else:
            drawn = self.draw_guides(k, len(previous), self.generator)
        queries, guides = self._queries(engine, previous.queries, previous.completions, 1, None, drawn)
        labels = [f"layer-{k} query of {s.labels[o]}" for o in previous.owners]
        where = "--data.rollout.correction_sampling or sampling"
        flag = f"the layer-{k} max_new_tokens ({where})"
        if k in c.layer_overrides:
            flag = f"the layer-{k} max_new_tokens (--data.rollout.layer_overrides.{k}.correction_sampling, {where})"
        self._check_context(engine, queries, layer.sampling.max_new_tokens, labels, flag)
        # joint: every query's probe and its group's fresh samples come from one engine call; the fresh samples of
        # queries whose probe fails are then dropped.
        per_query = 1 + layer.fresh_corrections if c.joint_layer2 else 1
        args = (engine, queries, layer.sampling, per_query, previous.owners, s.seeds[_tag("probe", k)])
        probe, pregenerated = split_first(self._timed(s, "generate", generate, *args), per_query)
        probe_texts, probe_kept = self._turn2_texts(previous.judged, guides, probe)
        rp = self._timed(s, "reward", self._score, probe_texts, s.answers(previous.owners), record.stats)
        verified = select_verified(rp, c.correct_threshold)
        owners = torch.tensor(previous.owners, dtype=torch.long)
        kept = self._cap(verified, owners, layer.max_kept_per_problem, s.problems, s.step, _tag("cap", k))
        plan = CorrectionPlan.from_selection(kept, owners)
        correct = rp >= c.correct_threshold
        if len(previous):  # empty only on a lockstep rank that kept nothing in the layer before
            record.stats.update(
                {
                    f"layer{k}/probe_accuracy": float(correct.float().mean()),
                    f"layer{k}/verified_queries": float(verified.numel()),
                    f"layer{k}/kept_queries": float(len(plan)),
                    f"layer{k}/kept_per_problem": len(plan) / len(s.problems),
                    # corrections that state no answer of their own, so this turn keeps the previous one's
                    f"layer{k}/probe_kept_turn1": float(sum(probe_kept)) / max(1, len(probe_kept)),
                    f"tokens/{_tag('probe', k)}": float(probe.num_tokens),
                    # joint: every query's group was generated, kept or not
                    f"tokens/layer{k}_drawn": float(pregenerated.num_tokens) if c.joint_layer2 else 0.0,
                }
            )
        if k == 2:
            for j in range(min(2, len(probe))):
                record.samples[j].update(correction=probe.texts[j], correction_reward=float(rp[j]))
        return _Probes(queries, guides, probe, pregenerated, correct, plan)

    def _corrections(
        self,
        engine: GenerationEngine,
        s: _Step,
        layer: CorrectionLayer,
        previous: LayerRows,
        probes: _Probes,
        record: StepRecord,
    ) -> LayerRows:
        """H samples per kept query (the verified probe first when ``reuse_probe``), scored; one GRPO group each."""
        c, k = self.config, layer.layer
        K, H, fresh = len(probes.plan), layer.num_corrections, layer.fresh_corrections
        kept = probes.plan.query_index.tolist()
        if c.joint_layer2:
            more = take(probes.pregenerated, [q * fresh + h for q in kept for h in range(fresh)])
        else:
            owners = [previous.owners[q] for q in kept]
            queries = [probes.queries[q] for q in kept]
            args = (engine, queries, layer.sampling, fresh, owners, s.seeds[f"layer{k}"])
            more = self._timed(s, "generate", generate, *args)
        if not K:
            return LayerRows(k, [], [], [], torch.zeros(0), torch.zeros(0))
        rows: list[tuple[int, Generation, int]] = []  # (kept query, generation, its row there), group by group
        for j, q in enumerate(kept):
            rows += [(q, probes.probe, q)] if c.reuse_probe else []
            rows += [(q, more, j * fresh + h) for h in range(fresh)]
        group = Generation(
            [gen.token_ids[i] for _, gen, i in rows],
            [gen.texts[i] for _, gen, i in rows],
            [gen.finished[i] for _, gen, i in rows],
        )
        logprobs = None
        if more.logprobs is not None and probes.probe.logprobs is not None:
            logprobs = [gen.logprobs[i] for _, gen, i in rows]  # type: ignore[index]
        sources = [q for q, _, _ in rows]
        owners = [previous.owners[q] for q in sources]
        judged = [previous.judged[q] for q in sources]
        scored, _ = self._turn2_texts(judged, [probes.guides[q] for q in sources], group)
        r = self._timed(s, "reward", self._score, scored, s.answers(owners), record.stats)
        adv = group_advantages(r.view(K, H), c.advantage_scaling, c.advantage_eps).flatten()
        stats = record.stats
        stats[f"reward/layer{k}"] = float(r.mean())
        stats[f"tokens/layer{k}"] = float(sum(len(t) for t in group.token_ids))
        if not c.joint_layer2:
            # A reused probe was drawn, and counted, as a probe already.
            reused = sum(len(probes.probe.token_ids[q]) for q in kept) if c.reuse_probe else 0
            stats[f"tokens/layer{k}_drawn"] = stats[f"tokens/layer{k}"] - reused
        queries = [probes.queries[q] for q in sources]
        return LayerRows(k, queries, group.token_ids, group.finished, r, adv, logprobs, owners, scored)

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
        generated = stats["tokens/layer1"]
        for k in range(2, (self.config.depth) + 1):
            generated += stats.get(f"tokens/{_tag('probe', k)}", 0.0) + stats.get(f"tokens/layer{k}_drawn", 0.0)
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
