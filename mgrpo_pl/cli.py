"""The ``mgrpo`` command: LightningCLI over ``MGRPOModule`` and ``MGRPODataModule``.

``mgrpo fit|validate|test --config configs/<x>.yaml [--section.key=value ...]``; ``--print_config`` shows the
fully resolved configuration. The config is saved beside the logs of every run.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from mgrpo_pl.data.datamodule import MGRPODataModule
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.strategies import require_gpu  # also registers --trainer.strategy=fsdp2


class MGRPOCLI(LightningCLI):
    """LightningCLI with the links MGRPO needs between the data and the model settings."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Log-probs in the loss must be taken at the temperature the rollouts were sampled at.
        parser.link_arguments("data.rollout.sampling.temperature", "model.temperature", compute_fn=_loss_temperature)

    def before_instantiate_classes(self) -> None:
        # fsdp and deepspeed start only on CUDA GPUs: say so in one line before Lightning's traceback would.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        require_gpu(trainer.get("strategy", "auto"), trainer.get("accelerator", "auto"))
        # A checkpoint is data, not the user's configuration: its hyper-parameters may not switch on repository code.
        model = self._model_config()
        if model is not None and model.get("trust_remote_code") != self._trust_remote_code:
            if model.get("trust_remote_code"):
                warnings.warn(
                    "--ckpt_path: the checkpoint's hyper-parameters set trust_remote_code=True; ignored, only the "
                    "config or --model.trust_remote_code can turn it on",
                    stacklevel=2,
                )
            model["trust_remote_code"] = self._trust_remote_code

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # What the config and flags say, before LightningCLI merges in the hyper-parameters of a --ckpt_path file.
        model = self._model_config()
        self._trust_remote_code = bool(model.get("trust_remote_code", False)) if model is not None else False

    def _model_config(self) -> Any:
        subcommand = self.config.get("subcommand")
        return (self.config[subcommand] if subcommand else self.config).get("model")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # A checkpoint is a pickle: --ckpt_path loads only tensors and plain data unless --weights_only=false says the
        # file is trusted. Left at None, torch's own default would apply, which an environment variable can flip.
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, []):
            parser.set_defaults(weights_only=True)
        return parser


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


def main() -> None:
    """The ``mgrpo`` console script. It returns None: the script passes the return value to ``sys.exit``, which would
    print the CLI object and exit with status 1 after a successful run."""
    cli_main()


if __name__ == "__main__":
    main()
