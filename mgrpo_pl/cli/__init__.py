"""The ``mgrpo`` command: LightningCLI over ``MGRPOModule`` and ``MGRPODataModule``.

``mgrpo fit|validate|test --config configs/<x>.yaml [--section.key=value ...]``; ``--print_config`` shows the
fully resolved configuration. The config is saved beside the logs of every run.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mgrpo_pl.cli.checkpoint import LIGHTNING_CKPT_NAMES, read_hparams, resolve
from mgrpo_pl.cli.defaults import default_callbacks, default_plugins
from mgrpo_pl.cli.errors import EXIT_SIGTERM, MGRPOArgumentParser, debug_requested, fail
from mgrpo_pl.cli.export import main as export_main
from mgrpo_pl.data.datamodule import MGRPODataModule
from mgrpo_pl.errors import InputError
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.runtime.quiet import quiet_libraries
from mgrpo_pl.strategies import require_gpu  # also registers --trainer.strategy=fsdp2

# The settings groups (mgrpo_pl.settings) document each field in an attribute docstring: make those the --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

DESCRIPTION = (
    "mgrpo: train language models to reason and to correct their own mistakes with MGRPO (multi-layer GRPO) on "
    "PyTorch Lightning. `mgrpo <subcommand> --help` lists a subcommand's options; `mgrpo export --help` how to "
    "write a checkpoint as a Hugging Face folder."
)
SUBCOMMANDS = {
    "fit": "Train with MGRPO (GRPO with --data.rollout.layer2=false), evaluating the sets under data.val.",
    "validate": "Run the two-turn evaluation (Acc@t1, Acc@t2, delta, i->c, c->i) on the sets under data.val.",
    "test": "Run the two-turn evaluation (Acc@t1, Acc@t2, delta, i->c, c->i) on the sets under data.test.",
}


class MGRPOCLI(LightningCLI):
    """LightningCLI with the links MGRPO needs between the data and the model settings."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: the module has no predict step.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        main_kwargs.setdefault("description", DESCRIPTION)
        for name, text in SUBCOMMANDS.items():
            subparser_kwargs.setdefault(name, {}).setdefault("description", text)
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # The listing's one-liners come from Trainer's docstrings (cut mid-sentence); say what mgrpo's do.
        for choice in getattr(self.parser._subcommands_action, "_choices_actions", []) if add_subcommands else []:
            choice.help = SUBCOMMANDS.get(choice.dest, choice.help)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Log-probs in the loss must be taken at the temperature the rollouts were sampled at.
        parser.link_arguments("data.rollout.sampling.temperature", "model.temperature", compute_fn=_loss_temperature)

    def before_instantiate_classes(self) -> None:
        # fsdp and deepspeed start only on CUDA GPUs: say so in one line before Lightning's traceback would.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        require_gpu(trainer.get("strategy", "auto"), trainer.get("accelerator", "auto"))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # What every mgrpo run gets (cli.defaults): preemption checkpoints, last.ckpt, flat memory, readable progress.
        added = default_callbacks(config, [*(config.get("callbacks") or []), *callbacks])
        config["plugins"] = default_plugins(config)
        return super()._instantiate_trainer(config, [*callbacks, *added])

    def _run_subcommand(self, subcommand: str) -> None:
        # A run that stops on the user's mistake (bad data found when the loaders are built, ...) before it wrote a
        # checkpoint leaves no run folder behind: an empty version_N would shift the next run's number away from the
        # paths the README and the user expect.
        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        existed = log_dir is not None and log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except InputError:
            if log_dir is not None and not existed and log_dir.is_dir() and not any(log_dir.rglob("*.ckpt")):
                shutil.rmtree(log_dir, ignore_errors=True)
            raise

    def _parse_ckpt_path(self) -> None:
        """Merge a ``--ckpt_path`` file's model hyper-parameters by the rules of ``cli.checkpoint``, not over the
        command line as LightningCLI does."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        if not path or path in LIGHTNING_CKPT_NAMES:
            return
        saved = read_hparams(path, weights_only=config.get("weights_only") is not False)
        if not saved:
            return
        given = config["model"].as_dict()
        defaults = self._subcommand_parsers[subcommand].get_defaults()["model"].as_dict()
        # A checkpoint is data, not the user's configuration: its hyper-parameters may not switch on repository code.
        if saved.pop("trust_remote_code", False) and not given.get("trust_remote_code"):
            warnings.warn(
                "--ckpt_path: the checkpoint's hyper-parameters set trust_remote_code=True; ignored, only the "
                "config or --model.trust_remote_code can turn it on",
                stacklevel=2,
            )
        applied, restored, overridden = resolve(path, saved, given, defaults)
        if restored:
            rank_zero_info(f"--ckpt_path {path}: settings taken from the checkpoint: {', '.join(restored)}")
        if overridden:
            warnings.warn(
                f"--ckpt_path {path}: the config or flags win over the checkpoint for {', '.join(overridden)}",
                stacklevel=2,
            )
        if applied:
            self.config = self.parser.parse_object({subcommand: {"model": applied}}, self.config)

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
    quiet_libraries()
    return MGRPOCLI(
        MGRPOModule,
        MGRPODataModule,
        save_config_kwargs={"overwrite": True},
        parser_class=MGRPOArgumentParser,
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    """The ``mgrpo`` console script. It returns None: the script passes the return value to ``sys.exit``, which would
    print the CLI object and exit with status 1 after a successful run.

    Bad input (``InputError``: data, settings, checkpoints) is printed as one message and exits with status 2;
    ``--debug`` or ``MGRPO_DEBUG=1`` shows the traceback instead. A run stopped by SIGTERM (or SIGUSR1) exits with
    143 after ``PreemptionCheckpoint`` saved where it stopped.
    """
    debug, args = debug_requested(sys.argv[1:] if argv is None else argv)
    MGRPOArgumentParser.debug = debug
    # A console script's sys.path starts with its bin folder, not the working directory (as `python -m` would): put
    # the working directory first so that a config's class_path can name the user's own module (my_rewards.MyReward).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = args
    try:
        if args[:1] == ["export"]:  # not a Trainer run: its own small parser (mgrpo_pl.cli.export)
            export_main(args[1:])
            return
        cli_main(None if argv is None else args)
    except SIGTERMException:
        raise SystemExit(EXIT_SIGTERM) from None
    except InputError as err:
        if debug:
            raise
        fail(str(err))
    finally:
        MGRPOArgumentParser.debug = False  # per call: a later cli_main in the same process is not in debug mode
        _release_process_group()


def _release_process_group() -> None:
    """Destroy the default process group a distributed run leaves initialised (Lightning does not).

    Left to interpreter shutdown, gloo's threads are torn down in no set order, and a DDP run that finished and
    wrote everything sometimes aborted there ("terminate called without an active exception", status 134, about
    one run in eight on 2 CPU processes).
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        # The finished run's modules first (FSDP2 keeps communication state in reference cycles), while the group
        # they communicate on still exists; then every rank leaves together.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
