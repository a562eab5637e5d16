"""LoRA policies through the real `mgrpo fit` and `mgrpo export`: only the adapters train and are checkpointed, the
reference is the base model itself, a resumed run is exact, and the exported folder generates what the policy does.

(DDP and FSDP2 with LoRA against one process: ``test_strategies.py``.)
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from resume_runs import TAGS, fit_args, scalars
from transformers import AutoModelForCausalLM

from mgrpo_pl.cli import cli_main, main
from mgrpo_pl.cli.export import export
from mgrpo_pl.errors import ConfigError
from mgrpo_pl.layouts import completion_logprobs, micro_batch_layout
from mgrpo_pl.method import encode_prompt
from mgrpo_pl.modeling.loading import load_causal_lm
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.rollout.types import RolloutBatch
from mgrpo_pl.settings import LoraSettings, LossSettings

LORA = ["--model.lora.r=4", "--model.lora.alpha=8", "--model.optimizer.init_args.lr=5.0e-2"]
CHECKPOINT_EVERY_STEP = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=1",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename={step}",
]


@pytest.fixture(scope="module")
def lora_run(tiny_model_path, tmp_path_factory):
    """A 4-step LoRA fit with a checkpoint after every step: (root, the module after training)."""
    root = tmp_path_factory.mktemp("lora")
    cli = cli_main(fit_args(tiny_model_path, root, 4, *LORA, *CHECKPOINT_EVERY_STEP))
    return root, cli.model


def _ckpt(root, step):
    return root / "lightning_logs" / "version_0" / "checkpoints" / f"step={step}.ckpt"


def test_only_the_adapters_train_and_the_checkpoint_holds_only_them(lora_run, tiny_model_path):
    root, module = lora_run
    base = dict(load_causal_lm(tiny_model_path).named_parameters())
    trained = dict(module.policy.named_parameters())
    adapters = {n for n in trained if ".lora_" in n}
    assert adapters and all(not trained[n].requires_grad for n in trained.keys() - adapters)
    for name, param in trained.items():
        if name in adapters:
            continue
        assert torch.equal(param.detach(), base[name.replace(".base_layer.", ".")].detach()), name
    moved = [n for n in adapters if "lora_B" in n and trained[n].detach().abs().max() > 0]
    assert moved, "the adapters' B matrices start at 0; training must move them"

    ckpt = torch.load(_ckpt(root, 4), map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_" in key for key in ckpt["state_dict"])
    assert {k.removeprefix("policy.") for k in ckpt["state_dict"]} == adapters
    # AdamW holds the adapters only, with state for each (one entry per trained parameter).
    optimizer = ckpt["optimizer_states"][0]
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(optimizer["state"]) == len(adapters)


def _small_batch(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (6,), generator=g)
    seqs = [torch.cat([prompt, torch.randint(3, vocab, (n,), generator=g)]) for n in (5, 7)]
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor([6, 6]),
        advantages=torch.tensor([1.0, -1.0]),
        layer=torch.tensor([1, 1]),
        truncated=torch.zeros(2, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0]),
        num_problems=1,
        correct_t1=torch.tensor([True, False]),
        correct_t2=torch.zeros(0, dtype=torch.bool),
    )


def test_the_reference_is_the_base_model_with_the_adapters_off(tiny_model_path):
    module = MGRPOModule(model=str(tiny_model_path), loss=LossSettings(beta=0.1), lora=LoraSettings(r=4, alpha=8))
    module.load_models()
    assert module.reference is None  # no second copy of the model
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # adapters that change the output
    batch = _small_batch(len(module.tokenizer))
    plan, collate = micro_batch_layout(batch, 4096, shared=False, tree=False)
    mb = collate(batch, plan[0], 0, False)
    with torch.no_grad():
        base = completion_logprobs(load_causal_lm(tiny_model_path), mb)
        policy = completion_logprobs(module.policy, mb)
    reference = module._reference_logprobs(mb)
    assert torch.equal(reference[mb.mask], base[mb.mask])
    assert (policy[mb.mask] - base[mb.mask]).abs().max() > 1e-3  # the adapters are on for the policy


def test_gradient_checkpointing_gives_the_adapters_the_same_gradient(tiny_model_path):
    grads = []
    for checkpointing in (False, True):
        module = MGRPOModule(
            model=str(tiny_model_path),
            loss=LossSettings(beta=0.1),
            lora=LoraSettings(r=4, alpha=8),
            efficiency={"gradient_checkpointing": checkpointing},
        )
        torch.manual_seed(0)  # the adapters' A matrices are drawn at random
        module.load_models()
        with torch.no_grad():
            for name, param in module.policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.full_like(param, 0.05))
        module.backward_batch(_small_batch(len(module.tokenizer)))
        named = module.policy.named_parameters()
        grads.append({n: p.grad for n, p in named if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_resumed_lora_run_equals_the_uninterrupted_one(lora_run, tiny_model_path, tmp_path):
    root, _ = lora_run
    resumed = tmp_path / "resumed"
    cli_main(fit_args(tiny_model_path, resumed, 4, *LORA, f"--ckpt_path={_ckpt(root, 2)}", "--weights_only=true"))
    full, again = scalars(root / "lightning_logs" / "version_0"), scalars(resumed / "lightning_logs" / "version_0")
    for tag in TAGS:
        assert sorted(again[tag]) == [2, 3], (tag, again[tag])
        for step in (2, 3):
            assert again[tag][step] == pytest.approx(full[tag][step], rel=1e-6, abs=1e-9), (tag, step)
    assert len({round(v, 9) for v in full["train/loss_layer1"].values()}) > 1


def _greedy(model, tokenizer, prompts) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = model.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def test_export_merged_and_adapter_only_generate_what_the_policy_does(lora_run, tmp_path):
    from peft import PeftModel

    root, module = lora_run
    tokenizer = module.tokenizer
    prompts = [encode_prompt(tokenizer, q) for q in ("What is 2 + 3?", "What is 7 * 6?")]
    want = _greedy(module.policy.eval(), tokenizer, prompts)

    merged = export(str(_ckpt(root, 4)), tmp_path / "merged")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= {
        p.name for p in merged.iterdir()
    }
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert _greedy(plain, tokenizer, prompts) == want

    main(["export", f"--ckpt_path={_ckpt(root, 4)}", f"--out={tmp_path / 'adapter'}", "--adapter-only"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = load_causal_lm(module.model_path)
    assert _greedy(PeftModel.from_pretrained(base, tmp_path / "adapter"), tokenizer, prompts) == want

    if importlib.util.find_spec("vllm") is not None:
        # `vllm serve DIR` loads the folder as it is: a fresh process (vLLM's start-up state stays out of this one).
        got = json.loads(
            subprocess.run(
                [sys.executable, "-c", VLLM_GREEDY, str(merged), json.dumps(prompts)],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            ).stdout.splitlines()[-1]
        )
        assert got == want


VLLM_GREEDY = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
          kv_cache_memory_bytes=2**28, distributed_executor_backend="uni")
prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(sys.argv[2])]
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def test_export_of_a_full_fine_tuning_run(tiny_model_path, tmp_path, capsys):
    cli = cli_main(fit_args(tiny_model_path, tmp_path / "run", 1, *CHECKPOINT_EVERY_STEP))
    ckpt = _ckpt(tmp_path / "run", 1)
    folder = export(str(ckpt), tmp_path / "out")
    tokenizer = cli.model.tokenizer
    prompts = [encode_prompt(tokenizer, "What is 4 + 4?")]
    exported = AutoModelForCausalLM.from_pretrained(folder)
    assert _greedy(exported, tokenizer, prompts) == _greedy(cli.model.policy.eval(), tokenizer, prompts)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["export", f"--ckpt_path={ckpt}", f"--out={tmp_path / 'adapter'}", "--adapter-only"])
    assert stop.value.code == 2
    assert "--adapter-only" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_write(lora_run, tmp_path):
    root, _ = lora_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export(str(_ckpt(root, 1)), tmp_path / "full")
