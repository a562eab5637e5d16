"""``MGRPOModule``'s settings in four groups: the loss, how a step is computed, the optimisation schedule, LoRA.

Each group is a dataclass whose attribute docstrings are the ``mgrpo fit --help`` text of its flags
(``--model.loss.beta``, ``--model.efficiency.micro_batch_tokens``, ``--model.optim.warmup_ratio``,
``--model.lora.r``); in YAML they are nested under ``model.loss``, ``model.efficiency``, ``model.optim`` and
``model.lora``. A bad value raises ``ConfigError`` naming its flag when the group is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from mgrpo_pl.algo.losses import LOSS_AGGREGATIONS
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.modeling.loading import resolve_dtype
from mgrpo_pl.schedules import ScheduleName


@dataclass
class LossSettings:
    """The MGRPO loss: ``Σ_k w_k · L_k``, each ``L_k`` the clipped surrogate with the k3 KL (paper Eq. 2, 3, 6)."""

    beta: float = 0.001
    """Weight of the k3 KL to the frozen reference (paper: 0.001); 0 trains without loading the reference."""
    clip_eps: float = 0.2
    """PPO clip epsilon: the lower side, and the upper side unless clip_eps_high is set."""
    clip_eps_high: float | None = None
    """Upper clip epsilon ("clip-higher", DAPO); null uses clip_eps."""
    layer2_weight: float = 1.0
    """Weight w_2 of the layer-2 (correction) loss in the total; layer 1's is 1. Also the weight of every deeper
    layer that layer_weights does not list."""
    layer_weights: dict[int, float] = field(default_factory=dict)
    """Weights of correction layers by number, where they differ from layer2_weight, e.g. {3: 0.5}."""
    aggregation: str = "seq-mean-token-mean"
    """How token losses become a layer's loss: seq-mean-token-mean (paper), token-mean (DAPO),
    seq-mean-token-sum-norm (Dr. GRPO), or a name registered in mgrpo_pl.algo.losses.LOSS_AGGREGATIONS."""
    norm_length: int | None = None
    """The constant divisor of seq-mean-token-sum-norm; null uses the batch's longest completion."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's surrogate by min(pi_trainer / pi_engine, tis_cap), for an
    engine whose numerics differ from the trainer's (vLLM); null leaves tokens unweighted (the gap is logged anyway)."""
    mask_truncated: bool = False
    """Leave completions cut at the length limit out of the loss (DAPO's overlong filtering)."""

    def __post_init__(self) -> None:
        LOSS_AGGREGATIONS.get(self.aggregation)  # an unknown name raises ConfigError with the known ones
        if self.beta < 0:
            raise ConfigError(f"--model.loss.beta must be >= 0, got {self.beta}")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ConfigError("--model.loss.clip_eps and --model.loss.clip_eps_high must be > 0")
        try:  # JSON and flattened checkpoint settings give the layer numbers as strings
            self.layer_weights = {int(k): float(v) for k, v in self.layer_weights.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"--model.loss.layer_weights: give {{layer: weight}}, got {self.layer_weights}") from None
        bad = [k for k in self.layer_weights if k < 2]
        if bad:
            raise ConfigError(f"--model.loss.layer_weights: keys are correction layers (2, 3, ...), got {bad}")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(f"--model.loss.tis_cap must be >= 1 (or null to turn it off), got {self.tis_cap}")

    def weights(self, layers: range) -> dict[int, float]:
        """``{k: w_k}`` for the given layers: 1 for layer 1, ``layer_weights[k]`` or ``layer2_weight`` after."""
        return {k: 1.0 if k == 1 else self.layer_weights.get(k, self.layer2_weight) for k in layers}


@dataclass
class EfficiencySettings:
    """How a step is computed. None of these changes the loss or its gradient beyond float rounding."""

    micro_batch_tokens: int = 8192
    """Tokens per forward pass, padding included: bounds activation memory, not the batch."""
    shared_prefix: bool = True
    """Run each distinct prompt (layer 1) or correction query (layer 2) once per micro-batch, the rows that continue
    it on its key/value cache. Off by itself under gradient checkpointing, sharded strategies and half-precision
    autocast on a GPU."""
    prefix_tree: bool = True
    """With shared_prefix, run a layer-2 group on top of the keys and values of the layer-1 row its query repeats."""
    gradient_checkpointing: bool = False
    """Recompute the policy's activations in the backward: less memory, about a third more compute."""
    memory_efficient_mlp: bool = True
    """A SwiGLU MLP backward (Llama, Qwen2/3, Mistral) that keeps two of its four wide tensors per token: the same
    gradient, about a third less activation memory."""
    reference_dtype: str | None = None
    """The frozen reference's weights dtype (float32, bfloat16, float16 or auto); null uses --model.dtype. bfloat16
    halves its memory (as verl holds it); its rounding enters only the beta-weighted KL term."""

    def __post_init__(self) -> None:
        if self.micro_batch_tokens < 1:
            raise ConfigError(f"--model.efficiency.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.reference_dtype is not None:
            try:
                resolve_dtype(self.reference_dtype)
            except ValueError as err:
                raise ConfigError(f"--model.efficiency.reference_{err}") from None


@dataclass
class OptimSettings:
    """The learning-rate schedule and gradient clipping around the optimizer (``--model.optimizer``)."""

    lr_schedule: ScheduleName = "cosine"
    """constant, linear or cosine decay after the warm-up (paper: cosine)."""
    warmup_ratio: float = 0.03
    """Fraction of the run spent in linear warm-up (paper: 0.03)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the initial one."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this; null turns clipping off."""


@dataclass
class LoraSettings:
    """LoRA adapters (peft) in place of full fine-tuning: only the adapters train and sit in the optimizer, the
    reference is the same base model with the adapter off (no second copy), checkpoints hold the adapters only."""

    r: int = 0
    """Rank of the adapters; 0 (default) trains every weight."""
    alpha: float = 32.0
    """LoRA's alpha: the adapter's update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input (kept by --model.disable_dropout, which zeroes the base model's only)."""
    target_modules: str | list[str] = "all-linear"
    """The modules that get adapters: peft's "all-linear" (every linear layer but the output head) or a list of
    module names, e.g. [q_proj, k_proj, v_proj, o_proj]."""

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"--model.lora.r must be >= 0 (0 trains every weight), got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.r and not self.target_modules:
            raise ConfigError("--model.lora.target_modules is empty: name the modules that get adapters")

    @property
    def enabled(self) -> bool:
        return self.r > 0


Settings = TypeVar("Settings", LossSettings, EfficiencySettings, OptimSettings, LoraSettings)


def settings_of(kind: type[Settings], value: Settings | Mapping[str, Any] | None) -> Settings:
    """A private copy of a settings group, from an instance, a mapping (a checkpoint's hyper-parameters) or None."""
    if value is None:
        return kind()
    if isinstance(value, Mapping):
        known = {f.name for f in fields(kind)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown {kind.__name__} keys {unknown}; known: {sorted(known)}")
        return kind(**value)
    return kind(**asdict(value))
