"""Settings of the layered rollout (what to generate, how many layers, how to score it)."""

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
class CorrectionLayerSettings:
    """One correction layer's settings where they differ from the shared ones (``--data.rollout.layer_overrides``);
    a field left null takes the shared setting of the same name.

    Attributes:
        num_corrections: H of this layer: samples per kept query.
        guide_phrases: The pool this layer's guide phrases are drawn from.
        correction_sampling: Sampling of this layer's probes and samples (its temperature must equal layer 1's).
        max_kept_per_problem: Most of this layer's queries kept per problem.
    """

    num_corrections: int | None = None
    guide_phrases: list[str] | None = None
    correction_sampling: SamplingConfig | None = None
    max_kept_per_problem: int | None = None


@dataclass(frozen=True)
class CorrectionLayer:
    """The settings one correction layer runs with: its overrides resolved against the shared settings."""

    layer: int
    num_corrections: int
    fresh_corrections: int
    sampling: SamplingConfig
    max_kept_per_problem: int | None
    guide_phrases: tuple[str, ...]


@dataclass
class RolloutConfig:
    """How one training step's rollouts are produced (paper Sec. 4).

    Attributes:
        num_generations: G, layer-1 samples per problem (one GRPO group).
        layer2: Run the self-correction layer; False gives the one-round GRPO baseline (``num_layers`` 1).
        num_layers: N, the layers of a training step: 1 is one-round GRPO, 2 the paper's MGRPO, and each further
            layer k+1 corrects layer k: its query is a layer-k query ⊕ that query's sample ⊕ a fresh guide phrase,
            one assistant turn, with the same probe, selection and H-sample groups as layer 2. Null: 2, or 1 with
            ``layer2: false``.
        layer_overrides: Per correction layer k (2..N), the settings that differ from the shared ones
            (``CorrectionLayerSettings``), e.g. ``{3: {num_corrections: 2, max_kept_per_problem: 1}}``.
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
            again, giving Acc@t1 ... Acc@tN and the transitions of each consecutive pair and of t1 -> tN. Null: as
            many as the training layers, at least 2.
        seed: Seed of the guide-phrase draws.
        seed_per_problem: Draw every problem's samples and guide phrases from a generator seeded by
            ``(seed, step, problem id)``, so a problem gets the same rollout whichever rank or batch it lands in
            (data-parallel runs then reproduce a single-process run). Costs one engine call per problem instead of
            one per batch; applies to engines that sample from torch's RNG (the transformers engine).
    """

    num_generations: int = 8
    layer2: bool = True
    num_layers: int | None = None
    layer_overrides: dict[int, CorrectionLayerSettings] = field(default_factory=dict)
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
    eval_turns: int | None = None
    seed: int = 0
    seed_per_problem: bool = False

    def __post_init__(self) -> None:
        self._resolve_layers()
        if self.turns < 2:
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
        if self.depth >= 2 and not self.guide_phrases:
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
        if self.depth >= 2 and self.num_corrections == 1:
            warnings.warn(
                "--data.rollout.num_corrections (H) is 1: every layer-2 group has a single sample, so its advantage "
                "is 0 and layer 2 trains only through the KL term",
                stacklevel=2,
            )
        elif self.depth >= 2 and self.correction_sampling is not None and self.correction_sampling.greedy:
            warnings.warn(
                "--data.rollout.correction_sampling.temperature is 0 with H > 1: every layer-2 group's samples are "
                "identical, so their advantages are 0 and layer 2 learns nothing",
                stacklevel=2,
            )

    def _resolve_layers(self) -> None:
        """``layer2`` and ``num_layers`` agree, and every override is checked."""
        # The fields stay as given (null included): the CLI takes a default instance's fields as its defaults, so a
        # value derived here would then pin what a later flag should still derive.
        if self.num_layers is not None and not self.layer2 and self.num_layers != 1:
            raise ConfigError(
                f"--data.rollout.layer2=false asks for one layer but --data.rollout.num_layers={self.num_layers}: "
                "drop one of them"
            )
        if self.depth < 1:
            raise ConfigError(f"--data.rollout.num_layers must be >= 1, got {self.num_layers}")
        numbered = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in self.layer_overrides.items()}
        self.layer_overrides = numbered  # JSON gives the layer numbers as strings
        for k, override in numbered.items():
            flag = f"--data.rollout.layer_overrides.{k}"
            if not isinstance(k, int) or not 2 <= k <= self.depth:
                raise ConfigError(
                    f"{flag}: only correction layers 2..{self.depth} (--data.rollout.num_layers) can be overridden"
                )
            if isinstance(override, dict):  # given as a mapping in Python rather than parsed from the CLI
                self.layer_overrides[k] = override = CorrectionLayerSettings(**override)
            layer = self.correction_layer(k)
            if layer.num_corrections < 1 or (self.reuse_probe and layer.num_corrections < 2):
                least = 2 if self.reuse_probe else 1
                raise ConfigError(f"{flag}.num_corrections must be >= {least}, got {layer.num_corrections}")
            if layer.max_kept_per_problem is not None and layer.max_kept_per_problem < 1:
                raise ConfigError(f"{flag}.max_kept_per_problem must be >= 1, got {layer.max_kept_per_problem}")
            if not layer.guide_phrases or any(not phrase.strip() for phrase in layer.guide_phrases):
                raise ConfigError(f"{flag}.guide_phrases must hold at least one phrase and no blank one")
            if layer.sampling.temperature != self.sampling.temperature:
                raise ConfigError(
                    f"{flag}.correction_sampling.temperature={layer.sampling.temperature} differs from "
                    f"--data.rollout.sampling.temperature={self.sampling.temperature}: every layer's log-probs are "
                    "taken at the one temperature of --model.temperature; set them equal"
                )

    def correction_layer(self, k: int) -> CorrectionLayer:
        """Correction layer ``k``'s settings (k >= 2): its ``layer_overrides`` entry over the shared ones."""
        o = self.layer_overrides.get(k) or CorrectionLayerSettings()
        h = o.num_corrections if o.num_corrections is not None else self.num_corrections
        return CorrectionLayer(
            layer=k,
            num_corrections=h,
            fresh_corrections=h - 1 if self.reuse_probe else h,
            sampling=o.correction_sampling or self.layer2_sampling,
            max_kept_per_problem=o.max_kept_per_problem
            if o.max_kept_per_problem is not None
            else self.max_kept_per_problem,
            guide_phrases=tuple(o.guide_phrases if o.guide_phrases is not None else self.guide_phrases),
        )

    @property
    def depth(self) -> int:
        """N, the layers of a training step: ``num_layers``, else 2 (1 with ``layer2: false``)."""
        if self.num_layers is not None:
            return self.num_layers
        return 2 if self.layer2 else 1

    @property
    def turns(self) -> int:
        """Turns of the evaluation: ``eval_turns``, else as many as the training layers and at least 2."""
        return self.eval_turns if self.eval_turns is not None else max(2, self.depth)

    @property
    def correction_layers(self) -> list[CorrectionLayer]:
        """Layers 2..N's settings, in order."""
        return [self.correction_layer(k) for k in range(2, self.depth + 1)]

    @property
    def fresh_corrections(self) -> int:
        """Samples drawn per kept layer-2 query: H, or H-1 when the verified probe is reused as one of them."""
        return self.num_corrections - 1 if self.reuse_probe else self.num_corrections

    @property
    def layer2_sampling(self) -> SamplingConfig:
        return self.correction_sampling or self.sampling
