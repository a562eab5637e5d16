"""Checks mgrpo_pl on a CUDA GPU: the sampling loop, the log-probs, and real training steps on every strategy that
one GPU can run. CI has no GPU; run this once on a GPU machine after installing (``pip install -e .``).

Each check prints one line, PASS or FAIL with what it measured, and the script exits 1 when one fails:

* ``decode-parity``: greedy ``sample_completions`` gives exactly ``model.generate``'s tokens on the GPU (fp32);
* ``logprob-parity``: the behaviour log-probs recorded while sampling match a teacher-forced forward, in fp32 and
  under bf16 autocast (what a ``bf16-mixed`` trainer samples with);
* ``shared-prefix layout``: layer-2 groups trained through the shared-prefix layout give the plain layout's
  log-probs, with finite gradients, in fp32 and under bf16 autocast;
* ``fit``: real Lightning steps on the GPU, for each setting in ``FITS`` (precision, shared or copied engine,
  strategy): finite losses, the policy moved, the reference did not, and every batch was generated on-policy
  (a copied engine is on the GPU and holds the policy's weights after every push).

    python -m scripts.gpu_check            # ~1 minute on one H100
    python -m scripts.gpu_check --cpu      # the same checks on the CPU (no FSDP), e.g. to try the script
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
from lightning.pytorch import Callback, Trainer

import mgrpo_pl.strategies  # noqa: F401 - registers the "fsdp2" strategy name, as the mgrpo command does
from callbacks import RolloutCallback
from callbacks.rollout import policy_weights
from mgrpo_pl.algo.logprobs import token_logprobs
from mgrpo_pl.data.datamodule import MGRPODataModule, ProblemSet
from mgrpo_pl.layouts.padded import collate_micro_batch
from mgrpo_pl.layouts.shared_prefix import collate_shared_prefix, completion_logits
from mgrpo_pl.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.rewards import MathReward
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines import end_token_ids, param_checksum
from mgrpo_pl.rollout.engines.cpu.decoding import sample_completions
from mgrpo_pl.rollout.types import RolloutBatch, SamplingConfig
from mgrpo_pl.settings import EfficiencySettings, LossSettings, OptimSettings

# (name, precision, share_weights, strategy) of the training checks.
FITS = [
    ("fp32 shared engine", "32-true", True, "auto"),
    ("bf16-mixed copied engine", "bf16-mixed", False, "auto"),
    ("fsdp1 (1 GPU) bf16-mixed", "bf16-mixed", None, "fsdp"),
    ("fsdp2 (1 GPU) fp32", "32-true", None, "fsdp2"),
]
results: list[tuple[str, bool, str]] = []
# ``--cpu`` runs the same checks on the CPU (no FSDP): a dry run of this script on a machine without a GPU.
DEVICE = "cpu" if "--cpu" in sys.argv else "cuda"


def report(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def shaken_tiny(cache: str) -> tuple[torch.nn.Module, object]:
    """The tiny model with noise added: untouched, its greedy output repeats one token and would prove little."""
    path = resolve_model_path("tiny", cache)
    model, tokenizer = load_causal_lm(path, dtype="float32"), load_tokenizer(path)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.5)
    return model.to(DEVICE).eval(), tokenizer


def check_decoding(cache: str) -> None:
    model, tokenizer = shaken_tiny(cache)
    prompts = [tokenizer(f"What is {a} + {b}?")["input_ids"] for a, b in [(1, 2), (13, 4), (7, 77)]]
    end, pad = end_token_ids(model, tokenizer), int(tokenizer.pad_token_id)
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    ours, _, _ = sample_completions(model, prompts, 2, greedy, end, pad)
    same = 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=DEVICE)
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=end, pad_token_id=pad)
        theirs = out[0, len(prompt) :].tolist()
        theirs = theirs[: next((k + 1 for k, t in enumerate(theirs) if t in end), len(theirs))]
        same += sum(seq == theirs for seq in ours[2 * i : 2 * i + 2])
    report("decode-parity", same == 2 * len(prompts), f"{same}/{2 * len(prompts)} greedy samples equal generate's")

    sampling = SamplingConfig(max_new_tokens=24, temperature=0.8)
    # bf16 rounds each logit to ~3 significant digits, and the cached decode and the full forward multiply in
    # different shapes: a few tenths on the rare worst token of this noisy model, a few hundredths on average.
    for label, dtype, worst_ok, mean_ok in (("fp32", None, 1e-4, 1e-5), ("bf16 autocast", torch.bfloat16, 0.3, 0.03)):
        torch.manual_seed(0)
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
            tokens, _, behaviour = sample_completions(model, prompts, 4, sampling, end, pad)
        gaps = []
        for row, (seq, lps) in enumerate(zip(tokens, behaviour)):
            prompt = prompts[row // 4]
            ids = torch.tensor([prompt + seq], device=DEVICE)
            with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
                logits = model(ids).logits[:, len(prompt) - 1 : -1]
            forward = token_logprobs(logits, ids[:, len(prompt) :], temperature=0.8)[0]
            gaps.append((forward.float().cpu() - torch.tensor(lps)).abs())
        gap = torch.cat(gaps)
        worst, mean = float(gap.max()), float(gap.mean())
        report(
            f"logprob-parity {label}",
            worst < worst_ok and mean < mean_ok,
            f"|sampled - forward| max {worst:.2e}, mean {mean:.2e} over {len(gap)} tokens",
        )


def whole(named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters as whole tensors (FSDP2 shards the reference too)."""
    for name, tensor in named:
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def layer2_like_batch(scale: int = 1, seed: int = 0) -> RolloutBatch:
    """Three prompts of different lengths x three ragged completions (one empty): the shape of layer-2 groups."""
    g = torch.Generator().manual_seed(seed)
    seqs, plens = [], []
    for n in (9 * scale, 14 * scale, 4 * scale):
        prompt = torch.randint(3, 200, (n,), generator=g)
        for k in (5 * scale, 0, 8 * scale):
            seqs.append(torch.cat([prompt, torch.randint(3, 200, (k,), generator=g)]))
            plens.append(n)
    rows = len(seqs)
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(plens),
        advantages=torch.randn(rows, generator=g),
        layer=torch.full((rows,), 2),
        truncated=torch.zeros(rows, dtype=torch.bool),
        rewards=torch.zeros(rows),
        num_problems=3,
        correct_t1=torch.zeros(3, dtype=torch.bool),
        correct_t2=torch.zeros(0, dtype=torch.bool),
    ).to(DEVICE)


def check_layouts(cache: str, model_dir: str | None = None) -> None:
    """The shared-prefix layout (layer-2 groups) gives the plain layout's log-probs and finite gradients."""
    if model_dir is None:
        model, scale = shaken_tiny(cache)[0], 1
    else:  # a real-sized model, with layer-2-sized sequences
        model, scale = load_causal_lm(model_dir, dtype="float32").to(DEVICE), 12
    model.train()
    batch = layer2_like_batch(scale)
    rows = list(range(len(batch)))
    for label, dtype, tolerance in (("fp32", None, 1e-4), ("bf16 autocast", torch.bfloat16, 0.2)):
        outs = []
        for mb in (collate_micro_batch(batch, rows, 0, False), collate_shared_prefix(batch, rows, 0, False)):
            model.zero_grad()
            with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
                logp = token_logprobs(completion_logits(model, mb), mb.targets)
            (logp * mb.mask * mb.advantages[:, None]).sum().backward()
            grads_finite = all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
            outs.append((torch.cat([logp[r][mb.mask[r]].detach().float() for r in rows]), grads_finite))
        gap = float((outs[0][0] - outs[1][0]).abs().max())
        finite = outs[0][1] and outs[1][1] and bool(outs[1][0].isfinite().all())
        report(
            f"shared-prefix layout {label}",
            finite and gap < tolerance,
            f"max |shared - plain| log-prob {gap:.2e}; gradients finite: plain {outs[0][1]}, shared {outs[1][1]}",
        )


class OnPolicy(Callback):
    """After every push: the engine holds the policy's weights, on the policy's device."""

    def __init__(self, source: RolloutCallback) -> None:
        self.source, self.mismatch, self.devices, self.losses = source, 0, set(), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        engine = self.source.engine()
        self.devices.add(str(next(engine.model.parameters()).device))
        if not engine.shared:
            self.mismatch += self.source.pushed_checksums[-1] != param_checksum(engine.model.named_parameters())
        m = trainer.callback_metrics
        self.losses.append(float(m["train/loss_layer1"]) + float(m["train/loss_layer2"]))


def fsdp1_strategy(module: MGRPOModule) -> object:
    """FSDPStrategy with the decoder layers and the policy itself as units, as configs/strategies/fsdp.yaml has it
    (the policy's class keeps the root free of parameters; see ``mgrpo_pl.distributed.fsdp1_root_parameters``)."""
    from lightning.pytorch.strategies import FSDPStrategy

    module.load_models()
    policy = module.policy
    return FSDPStrategy(auto_wrap_policy={type(policy.model.layers[0]), type(policy)})


def check_fit(cache: str, name: str, precision: str, share: bool | None, strategy: str) -> None:
    torch.manual_seed(0)
    reward = MathReward(num_workers=1)
    module = MGRPOModule(
        model=resolve_model_path("tiny", cache),
        loss=LossSettings(beta=0.05),
        efficiency=EfficiencySettings(micro_batch_tokens=512),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        optim=OptimSettings(lr_schedule="constant"),
    )
    data = MGRPODataModule(
        train=ProblemSet("arithmetic", options={"n": 16, "max_value": 9}),
        batch_size=2,
        rollout=RolloutConfig(
            num_generations=4, num_corrections=2, sampling=SamplingConfig(max_new_tokens=12, temperature=1.0)
        ),
        reward=reward,
    )
    source = RolloutCallback(share_weights=share)
    watch = OnPolicy(source)
    trainer = Trainer(
        max_steps=3,
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        strategy=fsdp1_strategy(module) if strategy == "fsdp" else strategy,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="gpu-check-"),
        callbacks=[source, watch],
    )
    start = time.perf_counter()
    try:
        module.configure_model()
        before = param_checksum(policy_weights(module))
        reference = param_checksum(whole(module.reference.named_parameters()))
        trainer.fit(module, data)
        moved = param_checksum(policy_weights(module)) != before
        kept = param_checksum(whole(module.reference.named_parameters())) == reference
    except Exception as err:  # noqa: BLE001 - one failing setting must not hide the others
        report(f"fit {name}", False, f"{type(err).__name__}: {err}")
        return
    finally:
        reward.close()
    finite = bool(watch.losses) and all(math.isfinite(x) for x in watch.losses)
    on_gpu = watch.devices == {"cuda:0" if DEVICE == "cuda" else "cpu"}
    ok = finite and moved and kept and on_gpu and watch.mismatch == 0
    report(
        f"fit {name}",
        ok,
        f"{len(watch.losses)} steps in {time.perf_counter() - start:.1f} s, losses finite={finite}, policy moved="
        f"{moved}, reference kept={kept}, engine on {sorted(watch.devices)}, stale pushes={watch.mismatch}",
    )


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (--cpu runs the checks on the CPU)", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}", flush=True)
    cache = tempfile.mkdtemp(prefix="gpu-check-models-")
    if "--layouts" in sys.argv:  # --layouts MODEL_DIR: only the layout check, on that model
        check_layouts(cache, sys.argv[sys.argv.index("--layouts") + 1])
        return 0 if all(ok for _, ok, _ in results) else 1
    check_decoding(cache)
    check_layouts(cache)
    for name, precision, share, strategy in FITS:
        if DEVICE == "cpu" and strategy != "auto":
            continue
        check_fit(cache, name, precision, share, strategy)
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
