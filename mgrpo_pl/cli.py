"""The ``mgrpo`` command: LightningCLI over ``MGRPOModule`` and ``MGRPODataModule``.

``mgrpo fit|validate|test --config configs/<x>.yaml [--section.key=value ...]``; ``--print_config`` shows the
fully resolved configuration. The config is saved beside the logs of every run.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mgrpo_pl.data.datamodule import MGRPODataModule
from mgrpo_pl.module import MGRPOModule


class MGRPOCLI(LightningCLI):
    """LightningCLI with the links MGRPO needs between the data and the model settings."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Log-probs in the loss must be taken at the temperature the rollouts were sampled at.
        parser.link_arguments("data.rollout.sampling.temperature", "model.temperature", compute_fn=_loss_temperature)


def _loss_temperature(temperature: float) -> float:
    # Greedy rollouts (temperature 0) are scored against the untempered distribution.
    return temperature if temperature > 0 else 1.0


def cli_main(args: list[str] | None = None) -> MGRPOCLI:
    """Entry point of the ``mgrpo`` console script; ``args`` replaces ``sys.argv`` (for tests and notebooks)."""
    # Tokenizers' Rust thread pool and forked reward workers do not mix; generation is not tokenizer-bound.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return MGRPOCLI(
        MGRPOModule,
        MGRPODataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    cli_main()
