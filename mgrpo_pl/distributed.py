"""What the ranks of a data-parallel MGRPO step agree on, so that W ranks reproduce one process's step.

Every data-parallel rank makes rollouts for its own shard of the global batch (``EpochSampler``); groups never
straddle ranks, since a group lives within one problem. For the step to equal the single-process step on the union
of the shards:

* the loss normalisers (completions and tokens per layer, Dr. GRPO's constant length) are the global ones: summed
  (the length: the maximum) over ranks, so every rank's loss is its share of the global loss;
* each rank backpropagates ``data-parallel size x`` its share, because DDP, FSDP and DeepSpeed average gradients
  over ranks: the average of ``W * share_r`` is the sum of the shares, the global loss's gradient;
* logged values are global: sums are summed, means weighted by what they average over, wall times are the slowest
  rank's.

The reductions go through the trainer's strategy (``strategy.reduce``), not a process group of our own; a single
process passes ``reduce=None`` and everything here is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from mgrpo_pl.rollout.types import RolloutBatch

Reduce = Callable[[Tensor, str], Tensor]
"""``reduce(tensor, op)`` with op ``"sum"`` or ``"max"``: the tensor reduced over every rank (the same on all)."""

SUM_KEYS = (
    "kl_mean",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "ratio_mean",
    "engine_logprob_gap",
    "tis_weight",
    "tis_capped",
    "tokens",
)
"""The training step's summed statistics besides the per-layer losses (``MGRPOModule.backward_batch``)."""


def sum_keys(layers: Iterable[int]) -> tuple[str, ...]:
    """Every summed statistic of a step whose loss has the given layers; every rank reduces all of them."""
    return (*(f"loss/layer{k}" for k in layers), *SUM_KEYS)


# How each rollout statistic (``RolloutBatch.stats``) combines over ranks: "sum", "max", or "mean:<what>" for a
# mean over <what> (weighted by this rank's count of it). Unlisted statistics are averaged over ranks. Layer k's
# own statistics follow the pattern of layer 2's (its probes are one per row of layer k-1).
ROLLOUT_STAT_RULES = {
    "reward/layer1": "mean:layer1",
    "rollout/truncated_frac": "mean:sequences",
    "rollout/completion_len": "mean:layer1",
}


def layer_stat_rules(k: int) -> dict[str, str]:
    """The combining rules of correction layer ``k``'s statistics."""
    return {
        f"reward/layer{k}": f"mean:layer{k}",
        f"layer{k}/probe_accuracy": f"mean:layer{k - 1}",  # one probe per row of the layer before
        f"layer{k}/probe_kept_turn1": f"mean:layer{k - 1}",
        f"layer{k}/kept_queries": "sum",
        f"layer{k}/verified_queries": "sum",
        f"layer{k}/kept_per_problem": "mean:problems",
    }


def rollout_stat_rules(num_layers: int) -> dict[str, str]:
    rules = dict(ROLLOUT_STAT_RULES)
    for k in range(2, max(2, num_layers) + 1):
        rules.update(layer_stat_rules(k))
    return rules


def _rule(name: str, rules: dict[str, str]) -> str:
    if name in rules:
        return rules[name]
    if name.startswith("tokens/"):
        return "sum"
    if name.startswith("time/"):
        return "max"
    return "mean:ranks"


def global_normalisers(
    counts: dict[int, tuple[float, float]], norm_length: int, reduce: Reduce | None, device: torch.device
) -> tuple[dict[int, tuple[float, float]], int]:
    """Per-layer (completions, tokens) summed over ranks, and the longest completion of any rank."""
    if reduce is None:
        return counts, norm_length
    layers = sorted(counts)
    flat = torch.tensor([v for layer in layers for v in counts[layer]], dtype=torch.float64, device=device)
    flat = reduce(flat, "sum").tolist()
    longest = int(reduce(torch.tensor([norm_length], dtype=torch.long, device=device), "max").item())
    return {layer: (flat[2 * i], flat[2 * i + 1]) for i, layer in enumerate(layers)}, longest


def global_sums(
    sums: dict[str, float], reduce: Reduce | None, device: torch.device, layers: Iterable[int] = (1, 2)
) -> dict[str, float]:
    """``sum_keys(layers)`` (and anything else in ``sums``, on one process) summed over ranks."""
    keys = sum_keys(layers)
    if reduce is None:
        return {**dict.fromkeys(keys, 0.0), **sums}  # a key no micro-batch set (no layer-2 row...) counts as 0
    values = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, reduce(values, "sum").tolist()))


def global_rollout_stats(
    batch: RolloutBatch, reduce: Reduce | None, device: torch.device, names: list[str] | None = None
) -> dict[str, float]:
    """The batch's rollout statistics over the whole global batch (see ``ROLLOUT_STAT_RULES``).

    ``names`` must be the same on every rank (a rank that kept no layer-2 group has no ``reward/layer2``, for
    instance); a statistic a rank lacks counts with weight 0 there. Defaults to this batch's own names.
    """
    stats = batch.stats
    names = sorted(stats) if names is None else names
    if reduce is None:
        return {k: stats[k] for k in names if k in stats}
    layer = batch.layer.cpu()
    rules = rollout_stat_rules(batch.num_layers)
    weights = {f"layer{k}": float((layer == k).sum()) for k in range(1, max(2, batch.num_layers) + 1)}
    weights.update({"problems": float(batch.num_problems), "sequences": float(len(batch)), "ranks": 1.0})
    sums, maxima = [], []
    for name in names:
        rule = _rule(name, rules)
        present = name in stats
        if rule == "max":
            maxima.append(stats[name] if present else float("-inf"))
            continue
        weight = 1.0 if rule == "sum" else weights[rule.split(":", 1)[1]]
        weight = weight if present else 0.0
        sums += [stats.get(name, 0.0) * weight, weight]
    summed = reduce(torch.tensor(sums, dtype=torch.float64, device=device), "sum").tolist() if sums else []
    peaked = reduce(torch.tensor(maxima, dtype=torch.float64, device=device), "max").tolist() if maxima else []
    out: dict[str, float] = {}
    for name in names:
        rule = _rule(name, rules)
        if rule == "max":
            value = peaked.pop(0)
            if value != float("-inf"):
                out[name] = value
            continue
        total, weight = summed.pop(0), summed.pop(0)
        if weight > 0:
            out[name] = total if rule == "sum" else total / weight
    return out


def rollout_stat_names(num_layers: int) -> list[str]:
    """Every statistic the rollout of ``num_layers`` layers may report: the names all ranks reduce (so they agree on
    the tensors)."""
    layers = range(2, max(2, num_layers) + 1)
    names = [*rollout_stat_rules(num_layers), "tokens/layer1", "tokens/generated", "time/generate_s", "time/reward_s"]
    names += ["time/layer1_s", *(f"time/layer{k}_s" for k in layers)]
    names += [f"tokens/{name}" for k in layers for name in (f"layer{k}", "probe" if k == 2 else f"probe{k}")]
    names += [f"tokens/layer{k}_drawn" for k in layers]
    return sorted(names)


def fully_shard_models(models: list[nn.Module], mesh: object) -> None:
    """FSDP2 (``fully_shard``) over the data-parallel dimension of ``ModelParallelStrategy``'s device mesh: each
    transformer block (the model's ``_no_split_modules``), then the whole model.

    Raises:
        ValueError: when the mesh asks for tensor parallelism, which MGRPOModule does not implement.
    """
    from torch.distributed.fsdp import fully_shard

    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:  # type: ignore[index]
        raise ValueError(
            "MGRPOModule shards with FSDP2 only: set --trainer.strategy.init_args.tensor_parallel_size=1 and "
            "data_parallel_size to the number of processes (or use --trainer.strategy=fsdp2)"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh  # type: ignore[index]
    for model in models:
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)


def fsdp1_root_parameters(root: nn.Module) -> list[str]:
    """Names of the parameters an FSDP1 (``FullyShardedDataParallel``) root manages itself, outside every nested
    unit.

    ``MGRPOModule`` steps manually: ``training_step`` runs ``backward`` once per micro-batch, and under Lightning's
    ``FSDPStrategy`` it does so inside the root unit's forward (the root wraps the LightningModule). A parameter of
    the root's own unit is then still in its forward state when the backward reaches it, and FSDP stops with
    "Expects BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD". With the policy's own class
    in ``auto_wrap_policy`` every parameter belongs to a nested unit whose forward has ended, and this list is empty.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    nested = {
        id(p)
        for unit in root.modules()
        if unit is not root and isinstance(unit, FullyShardedDataParallel)
        for p in unit.parameters()
    }
    return [name for name, p in root.named_parameters() if id(p) not in nested]


def check_fsdp1_wrapping(root: object, policy: nn.Module) -> None:
    """Raise, naming the fix, when ``root`` is an FSDP1 root that holds parameters of its own (see
    ``fsdp1_root_parameters``); anything else passes.

    Raises:
        ValueError: with the first such parameter and the ``auto_wrap_policy`` that avoids it.
    """
    if not torch.distributed.is_available() or type(root).__name__ != "FullyShardedDataParallel":
        return
    owned = fsdp1_root_parameters(root)  # type: ignore[arg-type]
    if owned:
        name = f"{type(policy).__module__}.{type(policy).__name__}"
        raise ValueError(
            f"--trainer.strategy (FSDP1): the root unit holds {len(owned)} parameters of its own (first: {owned[0]}), "
            "and training_step's per-micro-batch backward would fail on them. Add the policy's class to the "
            f"strategy's auto_wrap_policy, e.g. `auto_wrap_policy: [<decoder layer class>, {name}]` "
            "(configs/strategies/fsdp.yaml does), or use --trainer.strategy=fsdp2"
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s forward runs collectives: FSDP2 (DTensor parameters), FSDP1 or DeepSpeed ZeRO-3."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return True
    return any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in model.parameters())


def pad_micro_batches(
    plan: list[list[int]], reduce: Reduce | None, sharded: bool, device: torch.device
) -> list[list[int] | None]:
    """The plan, padded with empty passes (None) to the busiest rank's count when forwards are collectives.

    Sharded forwards (FSDP, ZeRO-3) all-gather inside every pass, so every rank must run as many micro-batches as
    the busiest one; the others run passes whose rows are all masked out, which add nothing.
    """
    micro: list[list[int] | None] = list(plan)
    if reduce is not None and sharded:
        most = int(reduce(torch.tensor([len(micro)], device=device), "max").item())
        micro += [None] * (most - len(micro))
    return micro


@contextlib.contextmanager
def fsdp2_no_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2: accumulate unsharded gradients, without the reduce-scatter, until the block ends."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]
