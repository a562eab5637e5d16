"""Settings of the two-layer rollout (what to generate, how many, how to score it)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from mgrpo_pl.algo.advantages import ADVANTAGE_SCALINGS
from mgrpo_pl.algo.correction import DEFAULT_EVAL_GUIDE, DEFAULT_GUIDE_PHRASES, TURN2_SCORINGS
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.rollout.types import SamplingConfig

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class RolloutConfig:
    """How one training step's rollouts are produced (paper Sec. 4).

    Attributes:
        num_generations: G, layer-1 samples per problem (one GRPO group).
        layer2: Run the self-correction layer; False gives the one-round GRPO baseline.
        num_corrections: H, samples per kept layer-2 query (one layer-2 GRPO group).
        reuse_probe: Count the verified probe correction as one of the H samples (H-1 new ones are drawn).
            The paper draws H fresh variations, so this is off by default.
        joint_layer2: Generate every query's probe together with its group's fresh samples in one engine call, and
            drop the groups whose probe fails. The samples are the same in distribution (the group never depends on
            the probe's text, only on whether it was kept), one generation round is saved, but the groups of
            rejected queries are generated for nothing: it pays where a bigger batch is nearly free (GPU decoding, or
            small batches on CPU) and the probe pass rate is high.
        max_kept_per_problem: Most layer-2 queries kept per problem, drawn uniformly from its verified ones (from
            the guide-phrase generator, or per problem with ``seed_per_problem``); None (default) keeps every
            verified query, as the paper does. A compute bound: at a probe pass rate p a problem keeps about p*G
            queries and layer 2 samples and trains H for each, p*H times layer 1's G samples (2x at p = 1/2, H = 4;
            docs/performance.md); a cap c bounds that at c*H/G. The draw is uniform, so the kept data is an unbiased
            sample of the paper's, with the same right/wrong-at-turn-1 mix in expectation.
        guide_phrases: The pool p_guide is drawn from; the paper's seven phrases by default. May be empty only
            when nothing draws from it (layer 2 off and a fixed ``eval_guide``).
        guide_separator: Text put between the layer-1 completion and the guide phrase.
        think_close: Cut layer-1 completions before this marker so the guide continues the thinking block
            (reasoning models); None disables the cut.
        turn2_scoring: What turn 2's answer is, for the layer-2 reward, the probes' selection and Acc@t2 alike.
            ``final`` (default): the answer the model ends with, i.e. the correction's final answer when the
            correction states one (as the reward reads answers: ``Reward.final_answer``), else turn 1's (a correction
            that only affirms keeps it). ``correction``: the correction text alone (one that states no answer
            scores 0). ``full``: the layer-1 text, guide and correction parsed as one text (an earlier box in the
            layer-1 text outranks a later unboxed answer).
        correct_threshold: A reward at or above this counts as correct (selection and transition metrics).
        sampling: Sampling for layer 1.
        correction_sampling: Sampling for probes and layer-2 samples; None reuses ``sampling``.
        instruction: Appended to each problem in the user message.
        system_prompt: Optional system message.
        advantage_scaling: ``group`` (paper), ``batch``, ``none`` (Dr. GRPO) or a name registered in
            ``mgrpo_pl.algo.advantages.ADVANTAGE_SCALINGS``.
        advantage_eps: The eps in (r - mean) / (std + eps).
        eval_sampling: Sampling for the two-turn evaluation (paper: temperature 0.7).
        eval_samples: Samples per problem at evaluation (mean and spread are reported).
        eval_guide: Fixed turn-2 phrase at evaluation (default: one of the paper's, "Wait, let me double-check
            that."); None draws each phrase from the guide pool with evaluation's own generator, seeded by ``seed``
            and the problem, so evaluation never touches training's random streams.
        eval_turn2: ``continue`` (MGRPO's protocol: the guide continues the assistant turn) or ``new_turn`` (the
            guide is a new user message after the turn-1 answer, as in intrinsic self-correction baselines).
        eval_turns: Turns per problem at evaluation (>= 2): turn t continues turn t-1 with the evaluation phrase
            again, giving Acc@t1 ... Acc@tN and the transitions of each consecutive pair and of t1 -> tN.
        seed: Seed of the guide-phrase draws.
        seed_per_problem: Draw every problem's samples and guide phrases from a generator seeded by
            ``(seed, step, problem id)``, so a problem gets the same rollout whichever rank or batch it lands in
            (data-parallel runs then reproduce a single-process run). Costs one engine call per problem instead of
            one per batch; applies to engines that sample from torch's RNG (the transformers engine).
    """

    num_generations: int = 8
    layer2: bool = True
    num_corrections: int = 4
    reuse_probe: bool = False
    joint_layer2: bool = False
    max_kept_per_problem: int | None = None
    guide_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_GUIDE_PHRASES))
    guide_separator: str = "\n\n"
    think_close: str | None = "</think>"
    turn2_scoring: Literal["final", "correction", "full"] = "final"
    correct_threshold: float = 1.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    correction_sampling: SamplingConfig | None = None
    instruction: str = DEFAULT_INSTRUCTION
    system_prompt: str | None = None
    advantage_scaling: str = "group"
    advantage_eps: float = 1e-6
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))
    eval_samples: int = 1
    eval_guide: str | None = DEFAULT_EVAL_GUIDE
    eval_turn2: Literal["continue", "new_turn"] = "continue"
    eval_turns: int = 2
    seed: int = 0
    seed_per_problem: bool = False

    def __post_init__(self) -> None:
        if self.eval_turns < 2:
            raise ConfigError(
                f"--data.rollout.eval_turns must be >= 2 (turn 1 and a correction), got {self.eval_turns}"
            )
        if self.num_generations < 2:
            raise ConfigError(
                f"--data.rollout.num_generations (G) must be >= 2 for group-relative advantages, got "
                f"{self.num_generations}"
            )
        if self.num_corrections < 1:
            raise ConfigError(f"--data.rollout.num_corrections (H) must be >= 1, got {self.num_corrections}")
        if self.reuse_probe and self.num_corrections < 2:
            raise ConfigError("--data.rollout.reuse_probe needs --data.rollout.num_corrections >= 2")
        if self.max_kept_per_problem is not None and self.max_kept_per_problem < 1:
            raise ConfigError(
                f"--data.rollout.max_kept_per_problem must be >= 1 (or null to keep every verified query), got "
                f"{self.max_kept_per_problem}"
            )
        if self.layer2 and not self.guide_phrases:
            raise ConfigError("--data.rollout.guide_phrases is empty but layer 2 is on: give at least one phrase")
        if not self.guide_phrases and self.eval_guide is None:
            raise ConfigError(
                "--data.rollout.guide_phrases is empty and --data.rollout.eval_guide is not set: the turn-2 "
                "evaluation draws its phrase from the pool, so give at least one phrase or set eval_guide"
            )
        blank = [i for i, phrase in enumerate(self.guide_phrases) if not phrase.strip()]
        if blank:
            raise ConfigError(f"--data.rollout.guide_phrases has blank phrases at positions {blank}")
        if self.eval_guide is not None and not self.eval_guide.strip():
            raise ConfigError("--data.rollout.eval_guide is blank: give the turn-2 phrase, or null to use the pool")
        if self.eval_turn2 == "new_turn" and self.eval_guide is None:
            raise ConfigError("--data.rollout.eval_turn2=new_turn needs --data.rollout.eval_guide (the user's prompt)")
        if self.eval_samples < 1:
            raise ConfigError(f"--data.rollout.eval_samples must be >= 1, got {self.eval_samples}")
        if self.turn2_scoring not in TURN2_SCORINGS:
            raise ConfigError(
                f"--data.rollout.turn2_scoring must be one of {', '.join(TURN2_SCORINGS)}, got {self.turn2_scoring!r}"
            )
        if self.correction_sampling is not None and self.correction_sampling.temperature != self.sampling.temperature:
            # The module takes every layer's log-probs at one temperature (--model.temperature, linked from
            # sampling.temperature): layer 2 sampled at another would be trained against the wrong behaviour policy.
            raise ConfigError(
                f"--data.rollout.correction_sampling.temperature={self.correction_sampling.temperature} differs from "
                f"--data.rollout.sampling.temperature={self.sampling.temperature}: log-probs of both layers are taken "
                "at the one temperature of --model.temperature; set them equal"
            )
        ADVANTAGE_SCALINGS.get(self.advantage_scaling)  # an unknown name raises ConfigError with the known ones
        if self.sampling.greedy:
            warnings.warn(
                "--data.rollout.sampling.temperature is 0 with G > 1: every group's samples are identical, so all "
                "advantages are 0 and nothing is learned",
                stacklevel=2,
            )
        if self.layer2 and self.num_corrections == 1:
            warnings.warn(
                "--data.rollout.num_corrections (H) is 1: every layer-2 group has a single sample, so its advantage "
                "is 0 and layer 2 trains only through the KL term",
                stacklevel=2,
            )
        elif self.layer2 and self.correction_sampling is not None and self.correction_sampling.greedy:
            warnings.warn(
                "--data.rollout.correction_sampling.temperature is 0 with H > 1: every layer-2 group's samples are "
                "identical, so their advantages are 0 and layer 2 learns nothing",
                stacklevel=2,
            )

    @property
    def fresh_corrections(self) -> int:
        """Samples drawn per kept layer-2 query: H, or H-1 when the verified probe is reused as one of them."""
        return self.num_corrections - 1 if self.reuse_probe else self.num_corrections

    @property
    def layer2_sampling(self) -> SamplingConfig:
        return self.correction_sampling or self.sampling
