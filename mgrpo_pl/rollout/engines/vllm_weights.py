"""vLLM's side of the weight push: a worker extension that reloads HF-named tensors in place, and the read-back of
the weights its kernels really compute with (the proof behind ``VLLMEngine.weights_checksum``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

__all__ = ["WeightSyncExtension", "read_checkpoint_weights"]


def _tensor_stats(tensor: Tensor) -> tuple[float, float]:
    """(sum, sum of |x|) in float64: the two terms ``param_checksum`` takes from each tensor."""
    t = tensor.detach().double()
    return float(t.sum()), float(t.abs().sum())


def _combine_stats(stats: Sequence[tuple[float, float]]) -> float:
    """``param_checksum``'s formula applied to per-tensor stats, term for term, so the two agree to the last bit.

    The worker keeps only two floats per tensor (not the tensors) and combines them in the pushed order.
    """
    total = 0.0
    for i, (plain, absolute) in enumerate(stats):
        total += plain * (1.0 + 1e-3 * i) + absolute
    return total


@torch.no_grad()
def _kernel_matrix(module: nn.Module) -> Tensor:
    """The ``[out, in]`` matrix a linear-like module's kernel multiplies by, contiguous.

    On CPU vLLM packs each GEMM weight for its kernel (``cpu_linear``) and may drop ``weight``; the matrix is then
    read through the kernel with an identity input. Elsewhere ``weight`` is what the kernel uses.
    """
    weight = module.weight
    if not hasattr(module, "cpu_linear"):
        return weight.detach()
    n_in = weight.shape[1] if weight.ndim == 2 and weight.numel() else module.input_size_per_partition
    eye = torch.eye(n_in, dtype=weight.dtype, device=weight.device)
    return module.quant_method.apply(module, eye).t().contiguous()


def _shared_weight_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Modules whose ``weight`` Parameter is owned by an earlier module (tied embeddings): (name, module, owner)."""
    owners: dict[int, str] = {}
    shared = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) in owners:
            shared.append((name, module, owners[id(weight)]))
        else:
            owners[id(weight)] = name
    return shared


def read_checkpoint_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The weights a vLLM model computes with, one tensor at a time, under HF checkpoint names.

    Fused layers listed in ``model.packed_modules_mapping`` are split back into their parts; embeddings and LM heads
    lose vLLM's vocabulary padding; linears and LM heads are read through their kernels (``_kernel_matrix``).
    Single-GPU/CPU layout only (tensor-parallel size 1): shards are not gathered.
    """
    packed: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {}) or {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, VocabParallelEmbedding):
            rows = module.org_vocab_size
            # The embedding lookup reads `weight` itself; the LM head multiplies through its kernel.
            matrix = _kernel_matrix(module) if isinstance(module, ParallelLMHead) else module.weight
            yield f"{prefix}weight", matrix[:rows]
            continue
        if isinstance(module, LinearBase):
            tensors = {"weight": _kernel_matrix(module)}
            if getattr(module, "bias", None) is not None:
                tensors["bias"] = module.bias.detach()
            head, _, leaf = name.rpartition(".")
            parts = packed.get(leaf)
            sizes = getattr(module, "output_partition_sizes", None)
            if parts and sizes and len(parts) == len(sizes):
                for kind, tensor in tensors.items():
                    for part, piece in zip(parts, torch.split(tensor, list(sizes), dim=0)):
                        yield f"{head}.{part}.{kind}" if head else f"{part}.{kind}", piece.contiguous()
            else:
                for kind, tensor in tensors.items():
                    yield f"{prefix}{kind}", tensor
            continue
        for pname, param in own.items():
            yield f"{prefix}{pname}", param.detach()


class WeightSyncExtension:
    """Methods mixed into vLLM's worker (``worker_extension_cls``) for the in-place weight push and its read-back.

    Method names carry an ``mgrpo_`` prefix: vLLM refuses an extension that shadows a worker attribute.
    """

    def mgrpo_load_weights(
        self, weights: Iterable[tuple[str, Tensor]], stats: bool = False
    ) -> tuple[list[str], float | None]:
        """Load HF-named tensors in place (streamed: one tensor referenced at a time).

        Returns the names in push order and, with ``stats``, the checksum of the tensors as they arrived.
        """
        names: list[str] = []
        received: list[tuple[float, float]] = []

        def stream() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in weights:
                names.append(name)
                if stats:
                    received.append(_tensor_stats(tensor))
                yield name, tensor

        self.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        # A tied LM head is skipped by the loader (its weight arrives as embed_tokens'), so its kernel copy must be
        # rebuilt here from the shared, now-updated Parameter.
        for _, module, _ in _shared_weight_modules(model):
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)
        return names, (_combine_stats(received) if stats else None)

    def mgrpo_weights_checksum(self, names: Sequence[str]) -> float:
        """``param_checksum`` of the worker's current weights under ``names`` (the pushed HF names, in push order).

        Raises:
            KeyError: a pushed name has no counterpart in the engine's model (unsupported layout).
            RuntimeError: a tied module computes with a different matrix than the weight it shares (a stale copy).
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        wanted = set(names)
        stats: dict[str, tuple[float, float]] = {}
        for name, tensor in read_checkpoint_weights(model):
            if name in wanted:
                stats[name] = _tensor_stats(tensor)
        missing = [n for n in names if n not in stats]
        if missing:
            raise KeyError(f"cannot read back {missing[:5]} from the vLLM model ({len(missing)} missing)")
        for name, module, owner in _shared_weight_modules(model):
            if isinstance(module, ParallelLMHead):
                rows = module.org_vocab_size
                if not torch.equal(_kernel_matrix(module)[:rows], module.weight[:rows]):
                    raise RuntimeError(f"vLLM's {name} computes with a stale copy of {owner}.weight")
        return _combine_stats([stats[n] for n in names])
