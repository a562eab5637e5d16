"""Quiet by default: messages every run on a CPU machine prints, that ask for no action, are hidden.

``MGRPO_VERBOSE=1`` shows them all. Anything not listed here (a new warning, an error) still shows. Each entry says why
it needs no action, so that what is hidden is a decision, not a guess.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

VERBOSE_ENV = "MGRPO_VERBOSE"

# vLLM's WARNING records that are expected when mgrpo runs its CPU engine in-process (message starts).
VLLM_HARMLESS = (
    "libtcmalloc is not found in LD_PRELOAD",  # a speed hint for vLLM's CPU build; it generates without the preload
    "libiomp is not found in LD_PRELOAD",  # the same, for Intel's OpenMP
    "Triton is not installed",  # Triton compiles GPU and fused kernels; the CPU engine runs eager (enforce_eager)
    "Model Runner V2 requires Triton",  # the same: the V1 runner serves
    "Using None for EOS token id because tokenizer is not initialized",  # mgrpo passes token ids and stop ids itself
    "CPU backend doesn't allow to use `torch.set_num_threads`",  # mgrpo restores the trainer's threads after start
    "The global random seed is set to",  # mgrpo restores the trainer's random state after the engine starts
    "Enforce eager set",  # eager mode is mgrpo's choice (enforce_eager=True): no compile time on a CPU
    "Inductor compilation was disabled",  # the same
    "Reset SSM cache type",  # about state-space models; the policies here are transformers
)
# Python warnings from libraries, as (message regex, why it needs no action).
WARNINGS_HARMLESS = (
    r"`torch\.distributed\.reduce_op` is deprecated",  # vLLM's import touches a deprecated torch alias
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning on this torch version
    # Evaluation logs torchmetrics results that sum their counts over ranks themselves.
    r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level",
    # `mgrpo test|validate --ckpt_path` writes to a new run folder; the training run's top-k bookkeeping is not used.
    r"The dirpath has changed from",
)
# Lightning's INFO lines that advertise other products.
LIGHTNING_HARMLESS = ("💡 Tip:",)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class DropStarting(logging.Filter):
    """Drops records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...] | list[str]) -> None:
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _filter_handlers(logger_name: str, starts: tuple[str, ...]) -> None:
    # On the handlers: a logger's own filters do not see the records its child loggers propagate to it.
    for handler in logging.getLogger(logger_name).handlers:
        if not any(isinstance(f, DropStarting) and f.starts == starts for f in handler.filters):
            handler.addFilter(DropStarting(starts))


def vllm_logging_config() -> dict[str, object]:
    """vLLM's logging, as its ``VLLM_LOGGING_CONFIG_PATH`` takes it: warnings and errors, less ``VLLM_HARMLESS``.

    vLLM (re)configures its loggers when an engine starts, replacing any handler set earlier, so the filter has to
    be part of the configuration it applies.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"harmless": {"()": f"{__name__}.DropStarting", "starts": list(VLLM_HARMLESS)}},
        "formatters": {"vllm": {"format": "vLLM %(levelname)s [%(filename)s:%(lineno)d] %(message)s"}},
        "handlers": {
            "vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "filters": ["harmless"], "level": "WARNING"}
        },
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "WARNING", "propagate": False}},
    }


def quiet_libraries() -> None:
    """Hide the known harmless library messages for the rest of the process (no-op when verbose)."""
    if verbose():
        return
    for pattern in WARNINGS_HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    _filter_handlers("lightning.pytorch", LIGHTNING_HARMLESS)
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)  # "Triton not available" on a CPU
    # "Loading weights" bars: one per model load (policy, reference), a second each.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:  # a user's own vLLM logging config wins
        path = Path(tempfile.gettempdir()) / f"mgrpo_vllm_logging_{os.getpid()}.json"
        path.write_text(json.dumps(vllm_logging_config()))
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
