"""Lightning strategies by name for MGRPO, and the check that GPU-only strategies are not started on a CPU.

* ``ddp``: Lightning's own; one whole policy and reference per rank.
* ``fsdp2``: registered here. Lightning's ``ModelParallelStrategy`` with every process in one data-parallel group
  and no tensor parallelism (``MGRPOModule.configure_model`` applies FSDP2's ``fully_shard``). Lightning refuses
  ``--trainer.strategy=ModelParallelStrategy`` as a string (its defaults would also give tensor parallelism across
  a node's devices); ``--trainer.strategy=fsdp2`` or a ``class_path`` with ``data_parallel_size`` /
  ``tensor_parallel_size`` set are the two ways to ask for it.
* ``fsdp`` (FSDP1) and ``deepspeed*``: Lightning's own; they run on CUDA GPUs only, which ``require_gpu`` checks
  before any trainer is built, so a CPU run stops with one line instead of a traceback.

See docs/strategies.md for the configs and launch commands.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for plain FSDP2: data parallelism over every process of every node, no tensor
    parallelism. Keyword arguments are ``ModelParallelStrategy``'s."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) data parallelism over all processes"
    )

# Strategy names (and class names) that Lightning runs on CUDA GPUs only.
_GPU_ONLY = ("fsdp", "deepspeed")
_GPU_ONLY_CLASSES = ("FSDPStrategy", "DeepSpeedStrategy")


def gpu_requirement(strategy: object, accelerator: object) -> str | None:
    """The flag that needs a GPU (``--trainer.strategy=fsdp``...), or None when the settings can run on CPU.

    Args:
        strategy: ``trainer.strategy`` as parsed: a name, a ``Strategy`` object, or a namespace with ``class_path``.
        accelerator: ``trainer.accelerator`` as parsed.
    """
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", None) or type(strategy).__name__
    name = str(name)
    short = name.rsplit(".", 1)[-1]
    if short in _GPU_ONLY_CLASSES or (isinstance(strategy, str) and name != "fsdp2" and name.startswith(_GPU_ONLY)):
        return f"--trainer.strategy={name}"
    if str(accelerator) in ("gpu", "cuda"):
        return f"--trainer.accelerator={accelerator}"
    return None


def require_gpu(strategy: object, accelerator: object) -> None:
    """Stop with a one-line message when the settings need a CUDA GPU and there is none.

    Raises:
        SystemExit: with the message (exit status 1).
    """
    flag = gpu_requirement(strategy, accelerator)
    if flag is None or torch.cuda.is_available():
        return
    raise SystemExit(
        f"error: {flag} needs a GPU (CUDA), and none is available here. On CPU use --trainer.accelerator=cpu with "
        "--trainer.strategy=ddp or --trainer.strategy=fsdp2 (see docs/strategies.md)."
    )
