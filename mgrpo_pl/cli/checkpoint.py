"""What ``--ckpt_path`` may change in a run's settings.

LightningCLI copies a checkpoint's model hyper-parameters over the command line, so ``mgrpo test --model.model=X
--ckpt_path c`` would run c's model and never say so. Here the rule is explicit, key by key:

- a setting the config and flags leave at its default takes the checkpoint's value (that is what lets
  ``mgrpo test --ckpt_path c`` rebuild the trained model without repeating its settings), listed once at start;
- a setting the user gave that differs from the checkpoint's keeps the user's value, with a warning naming both;
- except the model itself: the checkpoint's weights belong to its model, so a different ``--model.model`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mgrpo_pl.errors import CheckpointError
from mgrpo_pl.settings import EfficiencySettings, LossSettings, OptimSettings

# Values of --ckpt_path that Lightning resolves itself (not file paths).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# Settings a checkpoint's weights cannot be separated from.
IDENTITY_KEYS = ("model",)


def read_hparams(path: str, weights_only: bool) -> dict[str, Any]:
    """The model hyper-parameters saved in the checkpoint at ``path`` (``{}`` when it has none).

    Raises:
        CheckpointError: the file is missing or cannot be read (truncated, not a checkpoint, or holding objects that
            a weights-only load refuses), with the path and the reason.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"--ckpt_path {path}: no such file")
    try:
        # mmap: only the hyper-parameters are needed here; the tensors are read when Lightning restores the state.
        ckpt = torch.load(path, weights_only=weights_only, map_location="cpu", mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"--ckpt_path {path}: cannot read the checkpoint: {reason}") from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"--ckpt_path {path}: not a Lightning checkpoint (a {type(ckpt).__name__})")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    return grouped(hparams)


# Where the settings of checkpoints written before the settings were grouped (mgrpo_pl.settings) live now: each
# group's fields under their own names, and loss_aggregation, which became loss.aggregation.
FLAT_TO_GROUPED = {
    field.name: (group, field.name)
    for group, kind in (("loss", LossSettings), ("efficiency", EfficiencySettings), ("optim", OptimSettings))
    for field in fields(kind)
} | {"loss_aggregation": ("loss", "aggregation")}
FLAT_TO_GROUPED.pop("aggregation")


def grouped(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters with any flat setting of the earlier layout moved into its group."""
    out = {k: v for k, v in hparams.items() if k not in FLAT_TO_GROUPED}
    for key, value in hparams.items():
        if key in FLAT_TO_GROUPED:
            group, name = FLAT_TO_GROUPED[key]
            out.setdefault(group, {})[name] = value
    return out


def resolve(
    path: str, saved: Mapping[str, Any], given: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Which of a checkpoint's hyper-parameters apply.

    Args:
        path: The checkpoint, for messages.
        saved: Its model hyper-parameters.
        given: The model settings from the config and flags.
        defaults: The settings' defaults (a value equal to its default counts as not given).

    Returns:
        ``(applied, restored, overridden)``: the checkpoint values to apply, and one line per setting taken from the
        checkpoint and per setting where the command line wins.

    Raises:
        CheckpointError: the command line names another model than the checkpoint's.
    """
    saved, given, defaults = _flat(saved), _flat(given), _flat(defaults)
    applied: dict[str, Any] = {}
    restored: list[str] = []
    overridden: list[str] = []
    for key, value in saved.items():
        mine = given.get(key, defaults.get(key))
        if mine == value:
            continue
        if key not in given or mine == defaults.get(key):
            applied[key] = value
            restored.append(f"model.{key}={value!r}")
        elif key in IDENTITY_KEYS:
            raise CheckpointError(
                f"--ckpt_path {path} holds weights of --model.{key}={value!r}, but the config or flags say "
                f"--model.{key}={mine!r}; drop the flag (the checkpoint's model is used) or pass the checkpoint's"
            )
        else:
            overridden.append(f"model.{key}={mine!r} (the checkpoint has {value!r})")
    return _nested(applied), restored, overridden


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"beta": 0.1}}`` as ``{"loss.beta": 0.1}``: a grouped setting is compared key by key."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *groups, name = key.split(".")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = value
    return out
