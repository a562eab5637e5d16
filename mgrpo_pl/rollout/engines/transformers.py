"""The transformers engine: generation with the policy module itself, on any device (CPU, tests).

On one process it samples through ``cpu.decoding.sample_completions`` (each distinct prompt computed once for its n
samples, finished rows leaving the batch, prefixes reused within a step); a sharded policy uses
``model.generate(synced_gpus=True)`` instead.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from mgrpo_pl.distributed import is_sharded
from mgrpo_pl.modeling.lora import strip_adapters
from mgrpo_pl.rollout.engines.base import GenerationEngine, end_token_ids, param_checksum
from mgrpo_pl.rollout.engines.cpu.decoding import left_pad, sample_completions
from mgrpo_pl.rollout.engines.cpu.prefix_cache import PrefixCache
from mgrpo_pl.rollout.types import Generation, SamplingConfig


class _BehaviourLogprobs(LogitsProcessor):
    """Records log p(token) of each sampled token at the sampling temperature.

    transformers applies user processors before its temperature/top-p warpers and never hands the sampled token
    to a processor, so each call reads the token chosen at the previous step from ``input_ids`` and applies the
    temperature itself. Memory stays at one [batch, vocab] row set, unlike ``output_scores`` (one per step).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.previous: Tensor | None = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """[rows, steps] log-probs once generation is over (``last_tokens``: [rows] final sampled tokens)."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(last_tokens), 0)


def engine_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.dtype`` of an engine ``dtype`` option, with an error that names the option."""
    if isinstance(name, torch.dtype):
        resolved = name
    else:
        resolved = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"engine dtype {name!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
    return resolved


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``model`` whose parameters are ``dtype``, made without a full-precision copy in between.

    ``deepcopy`` takes the cast parameters from its memo, so tied weights stay tied (one parameter object maps to
    one cast tensor) and the peak is the policy plus the cast copy. Buffers are copied as they are: the rotary
    frequencies of most models are kept in float32 on purpose.
    """
    memo = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in model.parameters()}
    # A LoRA policy's copy is a plain model with the adapters folded in: the trainer pushes merged weights.
    return strip_adapters(copy.deepcopy(model, memo)).eval().requires_grad_(False)


class TransformersEngine(GenerationEngine):
    """Batched generation with the transformers model itself, left-padded.

    Generation runs ``cpu.decoding.sample_completions``: each distinct prompt is computed once for its n samples,
    and finished rows leave the batch. A policy that is sharded across ranks uses ``model.generate`` with
    ``synced_gpus`` instead (see below).

    With shared weights (the default) the engine generates with the policy module itself, so it is on-policy by
    construction and ``update_weights`` has nothing to copy. With ``share_weights=False`` it keeps its own copy,
    refreshed through ``update_weights`` exactly as an external engine (vLLM) is. A ``dtype`` other than the
    policy's (``bfloat16`` for an fp32 policy) always means a copy: the engine samples in that precision, as vLLM
    serves in bf16 while the trainer keeps fp32 weights: on a CPU with bf16 matrix units it samples faster (the
    figures are in docs/performance.md); on a GPU it would spare autocast's per-op casts. The trainer
    still computes the loss's log-probs with its own weights; the gap to the engine's is logged as the behaviour
    mismatch.

    Sharded policies: when the shared policy is sharded across ranks (FSDP2 / FSDP1 / ZeRO-3), every forward
    all-gathers parameters, so every rank must run the same number of forwards although each generates for its own
    problems. The engine is then in ``lockstep``: ``generate`` passes ``synced_gpus=True`` (a rank that finished keeps
    stepping until all have) and every rank makes the same number of ``generate`` calls per ``generate`` (the
    largest chunk count of any rank; the others pad with a one-token dummy prompt). Callers must call ``generate``
    on every rank, with an empty list where a rank has nothing to generate (the rollout pipeline does).

    Args:
        model: The policy (a transformers causal LM).
        tokenizer: Its tokenizer; needs a pad token.
        share_weights: Generate with ``model`` itself instead of a private copy. None (default): share unless
            ``dtype`` asks for another precision than the policy's.
        dtype: The precision the engine samples in (``float32``, ``bfloat16``, ``float16`` or a ``torch.dtype``);
            None (default) keeps the policy's. Parameters are cast; buffers (rotary frequencies) keep theirs.
        max_batch_size: Most sequences (prompts x samples) per decode loop; bounds the key/value cache's memory.
            A call with more is split into several loops, each paying every decode step's fixed cost: on the
            2-core benchmark machine, 72 layer-2 rows took 4.7 s in one loop and 6.0 s as 64 + 8.
        record_logprobs: Return behaviour log-probs (costs one log-softmax per step).
        prefix_cache_mib: Most MiB of keys and values kept inside ``reuse_prefixes()`` (one rollout) for later
            calls that start with an earlier call's sequence; 0 turns the reuse off. The benchmark model holds
            16 KiB per token, SmolLM2-135M 45 KiB.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        share_weights: bool | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 128,
        record_logprobs: bool = True,
        prefix_cache_mib: int = 512,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        policy_dtype = next(model.parameters()).dtype
        target = policy_dtype if dtype is None else engine_dtype(dtype)
        if share_weights and target != policy_dtype:
            raise ValueError(
                f"dtype={dtype!r} needs the engine's own copy of the weights, but share_weights=True generates with "
                f"the policy itself, in its {policy_dtype}; set share_weights: false (or drop dtype)"
            )
        self.shared = target == policy_dtype if share_weights is None else share_weights
        self.model = model if self.shared else cast_copy(model, target)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.record_logprobs = record_logprobs
        self.end_ids = end_token_ids(model, tokenizer)
        self.pad_id = int(tokenizer.pad_token_id)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.autocast_dtype: torch.dtype | None = None
        if prefix_cache_mib < 0:
            raise ValueError(f"prefix_cache_mib must be >= 0 (0 turns prefix reuse off), got {prefix_cache_mib}")
        self.prefix_cache_mib = prefix_cache_mib
        self._prefix: PrefixCache | None = None

    def place(self, device: torch.device, autocast_dtype: torch.dtype | None = None) -> None:
        # The private copy is made at setup, before Lightning moves the policy to its device; without this it
        # would stay on the CPU and generate there while the policy trains on the GPU.
        if not self.shared and next(self.model.parameters()).device != device:
            self.model.to(device)
        self.autocast_dtype = autocast_dtype

    def _autocast(self) -> torch.autocast:
        """The trainer's mixed-precision context (set by ``place``), for both sampling paths; off by default."""
        device_type = next(self.model.parameters()).device.type
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    @property
    def lockstep(self) -> bool:
        """True when generation runs collectives across ranks (a shared, sharded policy under a process group)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        return is_sharded(self.model)

    @contextmanager
    def reuse_prefixes(self) -> Iterator[None]:
        # Lockstep ranks must run the same forwards; a prefix hit on one rank would skip a prefill the others run.
        if self.prefix_cache_mib == 0 or self._prefix is not None or self.lockstep:
            yield
            return
        self._prefix = PrefixCache(self.prefix_cache_mib << 20)
        try:
            yield
        finally:
            self._prefix = None

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self._prefix = None  # its keys came from the old weights
        if self.shared:
            return
        params = dict(self.model.named_parameters())
        params.update(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"engine model has no parameter {name!r}")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def weights_checksum(self) -> float:
        return param_checksum(self.model.named_parameters())

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int = 1) -> Generation:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        was_training = self.model.training
        lockstep = self.lockstep
        self.model.eval()
        try:
            # Sorting by length before chunking keeps the left padding of each chunk small.
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            per_call = max(1, self.max_batch_size // n)
            results: dict[int, tuple[list[list[int]], list[bool], list[list[float]] | None]] = {}
            chunks = [order[start : start + per_call] for start in range(0, len(order), per_call)]
            calls = len(chunks)
            if lockstep:
                # Agree on the number of calls before the first one: every call's forwards are collectives.
                count = torch.tensor([calls], device=next(self.model.parameters()).device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                calls = int(count)
            for c in range(calls):
                if c >= len(chunks):  # join the calls of ranks with more chunks; the dummy's output is dropped
                    with self._autocast():
                        self._generate_chunk([[self.end_ids[0] if self.end_ids else self.pad_id]], sampling, 1, True)
                    continue
                with self._autocast():
                    outs = self._generate_chunk([prompts[i] for i in chunks[c]], sampling, n, lockstep)
                for j, i in enumerate(chunks[c]):
                    results[i] = tuple(part[j * n : (j + 1) * n] if part is not None else None for part in outs)
        finally:
            self.model.train(was_training)
        token_ids = [seq for i in range(len(prompts)) for seq in results[i][0]]
        finished = [f for i in range(len(prompts)) for f in results[i][1]]
        logprobs = [lp for i in range(len(prompts)) for lp in results[i][2]] if self.record_logprobs else None
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return Generation(token_ids=token_ids, texts=texts, finished=finished, logprobs=logprobs)

    def _generate_chunk(
        self, prompts: list[Sequence[int]], sampling: SamplingConfig, n: int, synced: bool = False
    ) -> tuple[list[list[int]], list[bool], list[list[float]] | None]:
        if not synced:
            token_ids, finished, logprobs = sample_completions(
                self.model, prompts, n, sampling, self.end_ids, self.pad_id, prefix=self._prefix
            )
            return token_ids, finished, (logprobs if self.record_logprobs else None)
        # Lockstep: transformers' synced_gpus keeps a rank that has finished stepping until every rank has.
        device = next(self.model.parameters()).device
        input_ids, attention = left_pad(prompts, self.pad_id)
        width = input_ids.shape[1]
        recorder = _BehaviourLogprobs(sampling.temperature) if self.record_logprobs else None
        kwargs: dict[str, object] = {"do_sample": not sampling.greedy, "synced_gpus": True}
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=self.end_ids,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([recorder]) if recorder else None,
            **kwargs,
        )
        completions = out[:, width:].cpu()
        step_logprobs = recorder.finish(completions[:, -1]).cpu() if recorder else None
        token_ids, finished, logprobs = [], [], []
        end = torch.tensor(self.end_ids)
        for row in range(completions.shape[0]):
            seq = completions[row]
            hits = torch.isin(seq, end).nonzero()
            length = int(hits[0]) + 1 if len(hits) else seq.shape[0]
            token_ids.append(seq[:length].tolist())
            finished.append(bool(len(hits)))
            if step_logprobs is not None:
                logprobs.append(step_logprobs[row, :length].tolist())
        return token_ids, finished, (logprobs if step_logprobs is not None else None)
