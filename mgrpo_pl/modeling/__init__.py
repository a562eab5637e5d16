"""Models and tokenizers: the offline tiny test model, SmolLM2 from GGUF, and loading by name."""

from mgrpo_pl.modeling.gguf_convert import convert_gguf_to_hf, ensure_smollm2, find_smollm2_gguf
from mgrpo_pl.modeling.loading import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from mgrpo_pl.modeling.tiny import (
    build_tiny_model,
    build_tiny_tokenizer,
    default_cache_dir,
    ensure_tiny_model,
)

__all__ = [
    "build_tiny_model",
    "build_tiny_tokenizer",
    "convert_gguf_to_hf",
    "default_cache_dir",
    "ensure_smollm2",
    "ensure_tiny_model",
    "find_smollm2_gguf",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model_path",
]
