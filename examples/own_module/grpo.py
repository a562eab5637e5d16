"""Plain GRPO in a Lightning project of its own, built from mgrpo_pl's parts.

Nothing here is MGRPOModule or MGRPODataModule. The project keeps its own LightningModule and LightningDataModule and
takes from mgrpo_pl only:

- ``callbacks.RolloutCallback``: builds the generation engine from ``module.policy`` / ``module.tokenizer`` and pushes
  the new weights into it after every optimizer step;
- ``mgrpo_pl.algo``: group advantages, token log-probs, the clipped policy loss and its aggregation;
- ``mgrpo_pl.rewards.MathReward``: the timeout-safe math-verify reward;
- ``mgrpo_pl.metrics.SelfCorrectionMetrics`` with ``algo.correction.build_correction_query``: a two-turn check at
  validation (answer, then "let me double-check"), giving Acc@t1, Acc@t2, i→c and c→i.

    python grpo.py --model tiny --steps 2
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from callbacks import RolloutCallback
from mgrpo_pl.algo import aggregate, group_advantages, policy_loss, token_logprobs
from mgrpo_pl.algo.correction import DEFAULT_EVAL_GUIDE, build_correction_query
from mgrpo_pl.data.loaders import arithmetic_problems
from mgrpo_pl.method import encode_prompt
from mgrpo_pl.metrics import SelfCorrectionMetrics
from mgrpo_pl.rewards import MathReward
from mgrpo_pl.rollout.source import RolloutSource
from mgrpo_pl.rollout.types import SamplingConfig

INSTRUCTION = "Give the final answer as a number on the last line."


class PlainGRPO(LightningModule):
    """GRPO with one optimizer step per rollout batch. The two attributes RolloutCallback reads are ``policy`` (the
    model it generates with, or copies weights from) and ``tokenizer``; it calls ``configure_model`` to build them
    before the first step."""

    def __init__(self, model_path: str, lr: float = 1e-4, temperature: float = 1.0) -> None:
        super().__init__()
        self.model_path, self.lr, self.temperature = model_path, lr, temperature
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.policy: torch.nn.Module | None = None
        self.transitions = SelfCorrectionMetrics()

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = AutoModelForCausalLM.from_pretrained(self.model_path)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=0.0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = token_logprobs(logits, batch["input_ids"][:, 1:], temperature=self.temperature)
        mask = batch["completion_mask"][:, 1:]
        # One step per batch: the old policy is this one, detached (the ratio is 1, the gradient the policy's).
        out = policy_loss(logp, logp.detach(), batch["advantages"], beta=0.0)
        loss = aggregate(out.loss, mask, "seq-mean-token-mean")
        self.log_dict({"train/loss": loss, "train/reward": batch["rewards"].mean()}, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.transitions.update(batch["correct_t1"], batch["correct_t2"])

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.transitions.compute().items()})
        self.transitions.reset()


class RolloutData(LightningDataModule):
    """Batches of problems that become rollouts on the way to the module: in ``on_before_batch_transfer``, which
    Lightning calls after the previous optimizer step, so every batch is sampled from the current weights."""

    def __init__(
        self, reward=None, problems: int = 16, batch_size: int = 2, group_size: int = 4, max_new_tokens: int = 16
    ) -> None:
        super().__init__()
        self.train_set = arithmetic_problems(problems, seed=0, max_value=9)
        self.val_set = arithmetic_problems(4, seed=1, max_value=9)
        self.batch_size, self.group_size = batch_size, group_size
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
        # Any callable reward(completions, answers) -> Tensor in [0, 1]; math-verify in worker processes by default.
        self.reward = reward if reward is not None else MathReward(num_workers=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=list)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set), collate_fn=list)

    def teardown(self, stage: str) -> None:
        if isinstance(self.reward, MathReward):
            self.reward.close()

    def on_before_batch_transfer(self, batch: list, dataloader_idx: int) -> dict[str, torch.Tensor]:
        source = next(c for c in self.trainer.callbacks if isinstance(c, RolloutSource))
        engine, tokenizer = source.engine(), self.trainer.lightning_module.tokenizer
        prompts = [encode_prompt(tokenizer, p.question, INSTRUCTION) for p in batch]
        if not self.trainer.training:
            return self._two_turns(engine, tokenizer, prompts, batch)
        G = self.group_size
        gen = engine.generate(prompts, self.sampling, n=G)  # prompt-major: problem 0's G samples first
        rewards = self.reward(gen.texts, [p.answer for p in batch for _ in range(G)])
        sequences = [torch.tensor(prompts[i // G] + gen.token_ids[i]) for i in range(len(gen))]
        completion = [torch.arange(len(s)) >= len(prompts[i // G]) for i, s in enumerate(sequences)]
        pad = int(tokenizer.pad_token_id)
        return {
            "input_ids": pad_sequence(sequences, batch_first=True, padding_value=pad),
            "attention_mask": pad_sequence([torch.ones(len(s), dtype=torch.long) for s in sequences], batch_first=True),
            "completion_mask": pad_sequence(completion, batch_first=True),
            "advantages": group_advantages(rewards.view(len(batch), G)).flatten(),
            "rewards": rewards,
        }

    def _two_turns(self, engine, tokenizer, prompts: list[list[int]], batch: list) -> dict[str, torch.Tensor]:
        """Turn 1 answers; turn 2 continues the same assistant turn after a fixed double-check phrase."""
        answers = [p.answer for p in batch]
        first = engine.generate(prompts, self.sampling, n=1)
        guide = tokenizer(" " + DEFAULT_EVAL_GUIDE, add_special_tokens=False)["input_ids"]
        queries = [build_correction_query(q, o, guide, engine.end_ids) for q, o in zip(prompts, first.token_ids)]
        second = engine.generate(queries, self.sampling, n=1)
        return {
            "correct_t1": self.reward(first.texts, answers) >= 1.0,
            "correct_t2": self.reward(second.texts, answers) >= 1.0,
        }


def model_path_or_name(name: str) -> str:
    """A local folder or hub id as given; ``tiny`` is mgrpo_pl's offline random model (for a run without a hub)."""
    if name != "tiny":
        return name
    from mgrpo_pl.modeling import resolve_model_path

    return resolve_model_path("tiny")


def main(argv: list[str] | None = None, reward=None) -> PlainGRPO:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a local folder, a hub id, or tiny")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--root", default="runs/own_module", help="where Lightning writes logs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module = PlainGRPO(model_path_or_name(args.model))
    trainer = Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        default_root_dir=args.root,
        callbacks=[RolloutCallback(engine="transformers")],
        val_check_interval=args.steps,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=RolloutData(reward))
    return module


if __name__ == "__main__":
    main()
