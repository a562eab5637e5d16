"""The vLLM generation engine: colocated with the trainer, in the same process, refreshed in place every step.

Shape of the engine (generation sits behind one engine interface, ``rollout/engines/base.py``):

* **In-process.** ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``distributed_executor_backend="uni"`` put vLLM's engine
  core and its one worker in this process, so the weight push hands the worker the policy's tensors by reference:
  no serialisation, no copy beyond the one into vLLM's own storage. (Multi-process vLLM would need the tensors
  serialised, e.g. as safetensors bytes; that is not implemented.)
* **Built from the policy, not from disk.** vLLM is given the policy's config (written to a temporary folder unless
  ``model_path`` names a folder) and ``load_format="dummy"``; the real weights are then pushed from the live policy.
  So a resumed or already-trained policy is what generates, whatever the checkpoint folder holds.
* **Weight push.** A worker extension (``worker_extension_cls``, mixed into vLLM's worker class) calls the worker's
  ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``: vLLM's own in-place reload, which maps HF
  names onto its fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and re-runs each layer's weight
  processing. Tied embeddings need one more step: ``lm_head`` shares its ``weight`` with ``embed_tokens`` but is never
  loaded itself, so on CPU its packed GEMM copy would stay stale; every module that shares a weight with another is
  re-processed after the load. Then the prefix cache is reset (its KV entries came from the old weights).
* **Proof of the push.** ``weights_checksum`` reads the weights back *from the worker's kernels*: vLLM's CPU linears
  drop ``weight`` after packing it for oneDNN, so each linear is read by multiplying the identity matrix through its
  kernel (``I @ W^T = W^T`` exactly: every output is one product by 1 plus zeros), fused layers are split back into
  their HF parts, vocabulary padding is cut. The checksum is ``param_checksum`` of those tensors under the pushed HF
  names, so it equals the policy's only if the engine really computes with the policy's weights (in the same dtype).
  On CPU that costs a few seconds per push for a 135M model; ``checksum="pushed"`` fingerprints the tensors as the
  worker received them instead (cheap, but no proof that the kernels use them).
* **Behaviour log-probs** use ``logprobs_mode="processed_logprobs"``: log-softmax of the logits after temperature
  (and top-k/top-p, when set), i.e. the distribution the token was actually drawn from. With top-p 1 and top-k 0
  this is exactly what the trainer computes at the same temperature; the transformers engine records it before
  top-k/top-p truncation, the one place the two engines differ.
* **Sleep mode** (GPU): ``sleep()`` frees the weights and KV cache while the trainer runs its step, ``wake_up()``
  before the push. vLLM refuses sleep mode on CPU, so there both are no-ops that log once.

Coexisting with the trainer in one process: vLLM initialises a one-process ``torch.distributed`` group (gloo on CPU),
and its start-up seeds the global RNGs, lowers the torch thread count, replaces ``torch.set_num_threads`` with a stub
that only warns (CPU worker), freezes the garbage collector and sets ``LD_PRELOAD``/``LOCAL_WORLD_SIZE`` for worker
processes it would spawn. The engine puts all but the process group back as they were, so the trainer (and the rest
of a test session) keeps its seeds, threads, GC and environment. While the engine lives, Lightning sees an
initialised process group of size 1: harmless (metric syncs are no-ops), though it then suggests ``sync_dist=True``.
``close()`` shuts the engine core down, which also destroys vLLM's process groups, so another engine can start later
in the same process.

Only ``mgrpo_pl.rollout.engines.build_engine`` imports this module, and only when ``vllm`` is asked for.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from mgrpo_pl.modeling.lora import merged_weights
from mgrpo_pl.rollout.engines.base import GenerationEngine, end_token_ids
from mgrpo_pl.rollout.engines.vllm_weights import WeightSyncExtension, read_checkpoint_weights
from mgrpo_pl.rollout.types import Generation, SamplingConfig
from mgrpo_pl.runtime.quiet import VERBOSE_ENV, DropStarting, verbose
from mgrpo_pl.runtime.rng import RngState

log = logging.getLogger(__name__)

__all__ = ["VLLMEngine", "WeightSyncExtension", "read_checkpoint_weights", "vllm_platform_usable"]


_EXTENSION = f"{WeightSyncExtension.__module__}.WeightSyncExtension"


def vllm_platform_usable() -> bool:
    """Whether this vLLM build found a device it runs on (CPU build, or a CUDA/ROCm build with a GPU present)."""
    return current_platform.is_cpu() or current_platform.is_cuda_alike()


class VLLMEngine(GenerationEngine):
    """Generation with an in-process vLLM ``LLM`` whose weights are pushed from the live policy.

    Args:
        model: The policy (a transformers causal LM); its config shapes the engine and its weights are pushed.
        tokenizer: Its tokenizer (decoding and end tokens; vLLM itself gets token ids only).
        model_path: A folder with the policy's ``config.json`` to build the engine from; by default the live
            policy's config is written to a temporary folder.
        dtype: Engine dtype (``float32``, ``bfloat16``, ...); defaults to the policy's. Checksums match the
            policy's only in the same dtype.
        gpu_memory_utilization: GPU share vLLM may take (weights + KV cache); kept low because the trainer is
            colocated. On CPU it is unused when a KV-cache size is set (always, see ``cpu_kv_cache_gib``).
        max_model_len: Longest prompt + completion; defaults to the model's.
        enforce_eager: No CUDA graphs / torch.compile (start-up in seconds; set False on GPU for speed).
        cpu_kv_cache_gib: KV-cache size on CPU in GiB, used unless ``VLLM_CPU_KVCACHE_SPACE`` is set.
        seed: vLLM's seed.
        sleep_mode: Offload weights and KV cache while the trainer steps (GPU only; None = where supported).
        sleep_level: vLLM sleep level: 1 keeps a CPU copy of the weights, 2 drops them (they are pushed anyway).
        enable_prefix_caching: Reuse KV of shared prefixes (layer-2 queries start with the layer-1 prompt).
        max_num_seqs: Most sequences vLLM runs at once; None keeps vLLM's default.
        record_logprobs: Return behaviour log-probs of the sampled tokens.
        checksum: What ``weights_checksum`` fingerprints. ``readback`` (default): the weights read back from the
            worker's kernels, the proof that generation uses the pushed weights; on CPU this multiplies an identity
            through every linear (SmolLM2-135M: ~2.3 s, about 4% of a demo step; on GPU the weights are read
            directly). ``pushed``: the tensors as the worker received them, computed during the push (cheap).
        llm_kwargs: Anything else for ``vllm.LLM``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_path: str | None = None,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        cpu_kv_cache_gib: float = 1.0,
        seed: int = 0,
        sleep_mode: bool | None = None,
        sleep_level: int = 1,
        enable_prefix_caching: bool = True,
        max_num_seqs: int | None = None,
        record_logprobs: bool = True,
        checksum: Literal["readback", "pushed"] = "readback",
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if checksum not in ("readback", "pushed"):
            raise ValueError(f"engine_kwargs.checksum must be 'readback' or 'pushed', got {checksum!r}")
        self.checksum_mode = checksum
        self.tokenizer = tokenizer
        self.end_ids = end_token_ids(model, tokenizer)
        self.record_logprobs = record_logprobs
        self.sleep_level = sleep_level
        self.on_cpu = current_platform.is_cpu()
        if sleep_mode and self.on_cpu:
            log.info("vLLM refuses sleep mode on CPU: sleep()/wake_up() will be no-ops")
        self.sleep_mode = sleep_mode is not False and not self.on_cpu
        self.asleep = False
        self._pushed_names: list[str] = []
        self._config_dir: str | None = None
        if model_path is None:
            self._config_dir = model_path = tempfile.mkdtemp(prefix="mgrpo_vllm_")
            model.config.save_pretrained(model_path)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(model_path)

        # In-process engine core: the worker then receives the policy's tensors by reference.
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=0 is forced: the weight push is in-process only")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = {
            "model": model_path,
            "skip_tokenizer_init": True,
            "load_format": "dummy",
            "dtype": dtype or str(model.dtype).removeprefix("torch."),
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enforce_eager": enforce_eager,
            "seed": seed,
            "enable_sleep_mode": self.sleep_mode,
            "enable_prefix_caching": enable_prefix_caching,
            "distributed_executor_backend": "uni",
            "worker_extension_cls": _EXTENSION,
            "logprobs_mode": "processed_logprobs",
        }
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if self.on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # An explicit size: otherwise vLLM sizes the CPU KV cache from a share of *all* memory.
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        kwargs.update(llm_kwargs or {})

        start = time.perf_counter()
        try:
            with _process_state_kept(), _quiet(_WARMUP_NOISE):
                self.llm = LLM(**kwargs)
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - start
        if not verbose():
            hidden = f"its known harmless messages are hidden ({VERBOSE_ENV}=1 shows them)"
            rank_zero_info(f"vLLM engine ready in {self.start_s:.1f} s; {hidden}")
        self._checksum: float | None = None
        # The initial push: a LoRA policy's weights with its adapters folded in, as the trainer pushes them.
        self.update_weights(merged_weights(model))

    # -- GenerationEngine ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, n: int = 1) -> Generation:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.wake_up()
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(self.end_ids),
            logprobs=0 if self.record_logprobs else None,
            detokenize=False,
        )
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        token_ids: list[list[int]] = []
        finished: list[bool] = []
        logprobs: list[list[float]] = []
        for request in outputs:
            for completion in sorted(request.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                token_ids.append(ids)
                finished.append(bool(ids) and ids[-1] in self.end_ids)
                if self.record_logprobs:
                    steps = completion.logprobs or []
                    logprobs.append([float(step[token].logprob) for step, token in zip(steps, ids)])
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return Generation(
            token_ids=token_ids, texts=texts, finished=finished, logprobs=logprobs if self.record_logprobs else None
        )

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.wake_up()
        start = time.perf_counter()
        self._checksum = None
        with _quiet(_RELOAD_NOISE):
            pushed = self.checksum_mode == "pushed"
            self._pushed_names, self._checksum = self.llm.collective_rpc(
                "mgrpo_load_weights", args=(iter(named_tensors), pushed)
            )[0]
        # Cached KV blocks were computed by the old weights: reusing them would silently mix policies.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after the weight push (requests still running?)")
        self.last_push_s = time.perf_counter() - start

    def weights_checksum(self) -> float:
        """Read back from the worker once per push (cached until the next one: the weights cannot change); in
        ``pushed`` mode, the checksum taken while the push streamed through the worker."""
        if not self._pushed_names:
            raise RuntimeError("no weights were pushed to the vLLM engine yet")
        if self._checksum is None:
            self.wake_up()
            self._checksum = float(self.llm.collective_rpc("mgrpo_weights_checksum", args=(self._pushed_names,))[0])
        return self._checksum

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            # Shutting the in-process engine core down also destroys vLLM's process groups.
            llm.llm_engine.engine_core.shutdown()
            del self.llm
            gc.collect()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    # -- sleep mode ------------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the engine's GPU memory while the trainer steps (no-op, logged once, where unsupported)."""
        if not self.sleep_mode:
            _log_once("vLLM sleep mode is off (unsupported on CPU): the engine keeps its memory during training")
            return
        if not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_up(self) -> None:
        """Re-allocate what ``sleep`` freed; generation and pushes call it themselves."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


# Set by vLLM's CPU platform for worker processes it would spawn: LD_PRELOAD would be inherited by the trainer's own
# child processes (reward workers), LOCAL_WORLD_SIZE is read by launchers' cluster-environment detection.
_TRAINER_ENV = ("LD_PRELOAD", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what vLLM's start-up does to process-wide state that belongs to the trainer.

    vLLM assumes a process of its own: it seeds the global RNGs, lowers the torch thread count, swaps
    ``torch.set_num_threads`` for a warning stub (CPU worker), freezes the garbage collector (engine core) and sets
    environment variables meant for its worker processes (``_TRAINER_ENV``). In-process, the trainer owns all of
    these, so they are put back as they were.
    """
    rng = RngState.capture(numpy=True)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    env = {key: os.environ.get(key) for key in _TRAINER_ENV}
    try:
        yield
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        gc.unfreeze()
        RngState.restore(rng)


# skip_tokenizer_init (the engine only sees token ids) makes vLLM's chat-template warm-up fail with a traceback.
_WARMUP_NOISE = ("vllm.renderers.base", ("Chat template warmup failed",))
# Every push: rotary embeddings have no weights, and a tied LM head gets its weight through embed_tokens (then
# re-processed by the extension; weights_checksum checks it).
_RELOAD_NOISE = (
    "vllm.model_executor.model_loader.reload.layerwise",
    ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights"),
)


@contextlib.contextmanager
def _quiet(noise: tuple[str, tuple[str, ...]]) -> Iterator[None]:
    logger = logging.getLogger(noise[0])
    drop = DropStarting(noise[1])
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)
