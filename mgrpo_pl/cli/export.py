"""``mgrpo export``: a run's checkpoint as a Hugging Face folder that ``from_pretrained`` and ``vllm serve`` load.

``mgrpo export --ckpt_path CKPT --out DIR [--adapter-only]`` writes the trained policy (config, safetensors weights,
generation config) and its tokenizer. A LoRA run's adapters are merged into the base weights, or, with
``--adapter-only``, saved as a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) that names its
base model; ``PeftModel.from_pretrained`` and vLLM's LoRA support load that.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mgrpo_pl.cli.checkpoint import read_hparams
from mgrpo_pl.errors import CheckpointError, ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgrpo export",
        description="Write a checkpoint's policy as a Hugging Face folder (config, safetensors, tokenizer).",
    )
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by mgrpo fit")
    p.add_argument("--out", required=True, help="the folder to write (created; must be empty if it exists)")
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="for a LoRA run: save the adapter alone (PEFT format) instead of merging it into the base weights",
    )
    return p


def export(ckpt_path: str, out: str | Path, adapter_only: bool = False) -> Path:
    """Write the checkpoint's policy (and tokenizer) to ``out``; returns the folder.

    Raises:
        CheckpointError: the checkpoint cannot be read or holds no policy weights.
        ConfigError: ``out`` is a non-empty folder, or ``adapter_only`` for a run without LoRA.
    """
    from mgrpo_pl.module import MGRPOModule

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; give a new one")
    hparams = read_hparams(ckpt_path, weights_only=True)
    if "model" not in hparams:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no model settings in it; was it written by mgrpo fit?")
    lora = (hparams.get("lora") or {}).get("r", 0) > 0
    if adapter_only and not lora:
        raise ConfigError(f"--adapter-only: --ckpt_path {ckpt_path} is a full fine-tuning run (no LoRA adapters)")
    # The KL's reference is not needed to write the policy: beta 0 skips loading it.
    hparams["loss"] = {**(hparams.get("loss") or {}), "beta": 0.0}
    module = MGRPOModule(**hparams)
    module.load_models()
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict")
    if not state:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: holds no weights (state_dict)")
    module.on_load_checkpoint(checkpoint)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("policy.")]
    if missing or unexpected:
        raise CheckpointError(
            f"--ckpt_path {ckpt_path}: its weights do not fit --model.model={hparams['model']!r}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    out.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        module.peft_model.save_pretrained(out)  # type: ignore[union-attr]
    else:
        # merge_and_unload folds the adapters into the base weights and returns the plain model.
        model = module.peft_model.merge_and_unload() if lora else module.policy  # type: ignore[union-attr]
        model.save_pretrained(out, safe_serialization=True)
    module.tokenizer.save_pretrained(out)
    return out


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    folder = export(args.ckpt_path, args.out, adapter_only=args.adapter_only)
    what = "adapter" if args.adapter_only else "model"
    print(f"mgrpo: wrote the {what} of {args.ckpt_path} to {folder}", flush=True)
