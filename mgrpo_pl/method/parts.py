"""The pieces both the training rollout and the two-turn evaluation use: prompts, correction queries, scoring.

Turn 2's answer is read one way everywhere (``turn2_scoring``): by default it is the answer the model ends with, the
correction's final answer when the correction states one and turn 1's otherwise, so the layer-2 reward, the probes'
selection and Acc@t2 at evaluation all judge the same thing.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from mgrpo_pl.algo.correction import GuidePool, build_correction_query, cap_per_problem, turn2_texts
from mgrpo_pl.rewards.reading import read_final_answer
from mgrpo_pl.rollout.config import RolloutConfig
from mgrpo_pl.rollout.engines.base import GenerationEngine
from mgrpo_pl.rollout.types import Generation

if TYPE_CHECKING:
    from mgrpo_pl.data.loaders import Problem
    from mgrpo_pl.rewards.base import RewardFunction


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, instruction: str = "", system_prompt: str | None = None
) -> list[int]:
    """Token ids of the problem as a user turn followed by the assistant's generation prompt.

    Tokenizers without a chat template (base models) get a plain ``Question: ... Answer:`` frame.
    """
    content = f"{question}\n{instruction}" if instruction else question
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return tokenizer(f"{prefix}Question: {content}\nAnswer:", add_special_tokens=True)["input_ids"]


class RolloutParts:
    """What the training rollout and the two-turn evaluation share: prompts, guide phrases, scoring and reading turn 2.

    Args:
        config: What to generate and how to score it.
        tokenizer: The policy's tokenizer.
        reward: Any ``RewardFunction``: ``reward(completions, answers) -> Tensor[N]`` in [0, 1].
    """

    def __init__(self, config: RolloutConfig, tokenizer: PreTrainedTokenizerBase, reward: RewardFunction) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.reward = reward
        # What counts as a stated answer is the reward's call, so that turn 2 is read as the reward reads answers.
        self.final_answer = getattr(reward, "final_answer", None) or read_final_answer
        # The config allows an empty pool only when nothing draws from it (layer 2 off, a fixed eval_guide).
        self.guides = GuidePool(config.guide_phrases or [config.eval_guide or ""])
        self.generator = torch.Generator().manual_seed(config.seed)
        # One table of phrases: the training pool, then the fixed evaluation phrase when one is set, then the pools of
        # correction layers that have their own.
        self.phrases = list(self.guides.phrases) + ([config.eval_guide] if config.eval_guide is not None else [])
        self.eval_guide_index = len(self.guides) if config.eval_guide is not None else None
        # Each correction layer's pool, as indices into the table: a layer draws j uniformly and uses pool[j].
        self.layer_pools: dict[int, list[int]] = {}
        for layer in config.correction_layers:
            if layer.guide_phrases == self.guides.phrases:
                self.layer_pools[layer.layer] = list(range(len(self.guides)))
            else:
                start = len(self.phrases)
                self.phrases += layer.guide_phrases
                self.layer_pools[layer.layer] = list(range(start, len(self.phrases)))
        sep = config.guide_separator
        self.guide_ids = [tokenizer(sep + p, add_special_tokens=False)["input_ids"] for p in self.phrases]
        self.think_ids = (
            tokenizer(config.think_close, add_special_tokens=False)["input_ids"] if config.think_close else []
        )
        self._encoded: dict[str, list[int]] = {}

    # -- shared pieces ------------------------------------------------------------------------------------------
    def encode(self, problems: Sequence[Problem]) -> list[list[int]]:
        """Each problem's prompt ids, tokenized once per question: the context check before training encodes every
        problem, and each rollout and evaluation encodes its batch again."""
        c = self.config
        out = []
        for p in problems:
            ids = self._encoded.get(p.question)
            if ids is None:
                ids = self._encoded[p.question] = encode_prompt(
                    self.tokenizer, p.question, c.instruction, c.system_prompt
                )
            out.append(list(ids))  # a copy: callers own their lists
        return out

    def context_budget(self, training: bool) -> tuple[int, str]:
        """Tokens the deepest query and its completion add to a prompt, and what they come from (for messages).

        Training: layer 1's ``max_new_tokens``, then per correction layer its longest guide phrase and its
        ``max_new_tokens``. Evaluation: each turn's ``max_new_tokens`` and the phrase between turns (new-turn
        evaluation adds the chat template's tokens, which the check before each turn covers).
        """
        c = self.config
        if not training:
            guide = max(len(self.guide_ids[g]) for g in self._eval_pool())
            budget = c.turns * c.eval_sampling.max_new_tokens + (c.turns - 1) * guide
            return budget, f"--data.rollout.eval_sampling.max_new_tokens x {c.turns} turns and their guide phrases"
        budget = c.sampling.max_new_tokens
        for layer in c.correction_layers:
            budget += max(len(self.guide_ids[g]) for g in self.layer_pools[layer.layer])
            budget += layer.sampling.max_new_tokens
        if c.depth == 1:
            return budget, "--data.rollout.sampling.max_new_tokens"
        return budget, (
            f"--data.rollout.sampling.max_new_tokens and, for each of the {c.depth - 1} correction layer(s) "
            "(--data.rollout.num_layers), its guide phrase and max_new_tokens"
        )

    def _eval_pool(self) -> list[int]:
        return [self.eval_guide_index] if self.eval_guide_index is not None else list(range(len(self.guides)))

    @staticmethod
    def _check_context(
        engine: GenerationEngine, queries: Sequence[Sequence[int]], max_new_tokens: int, names: Sequence[str], flag: str
    ) -> None:
        """Fail before generating when a query plus its completion budget cannot fit the model's context."""
        limit = engine.max_context
        if limit is None:
            return
        for query, name in zip(queries, names):
            if len(query) + max_new_tokens > limit:
                raise ValueError(
                    f"{name}: {len(query)} prompt tokens + {flag}={max_new_tokens} exceed the model's context of "
                    f"{limit} tokens; shorten the problem, lower {flag}, or filter long problems out of the data"
                )

    def _score(self, texts: list[str], answers: list[str], stats: dict[str, float] | None = None) -> Tensor:
        """Rewards of ``texts`` against their gold ``answers``, checked for shape and finiteness."""
        rewards = self.reward(texts, answers).float().cpu() if texts else torch.zeros(0)
        if stats is not None and texts and hasattr(self.reward, "stats"):
            # Items past their time limit score 0: counted so that a run where many do is visible in TensorBoard.
            stats["reward/timeouts"] = stats.get("reward/timeouts", 0.0) + self.reward.stats()["last_call_timeouts"]
        if rewards.shape != (len(texts),):
            raise ValueError(f"the reward returned shape {tuple(rewards.shape)} for {len(texts)} completions")
        if not torch.isfinite(rewards).all():
            bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
            raise ValueError(
                f"the reward returned non-finite values for completions {bad[:10]}: {texts[bad[0]]!r:.200}"
            )
        return rewards

    def draw_guides(self, layer: int, n: int, generator: torch.Generator) -> list[int]:
        """``n`` guide phrases of correction layer ``layer``'s pool, drawn uniformly, as indices into ``phrases``."""
        pool = self.layer_pools.get(layer, list(range(len(self.guides))))
        return [pool[j] for j in torch.randint(len(pool), (n,), generator=generator).tolist()]

    def _queries(
        self,
        engine: GenerationEngine,
        prompts: list[list[int]],
        completions: list[list[int]],
        per_prompt: int,
        guide: int | None,
        guides: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[list[int]], list[int]]:
        """Correction queries ``prompts[i // per_prompt] ⊕ completions[i] ⊕ guide``, with the guide index used for
        each (``guides`` when given, else ``guide`` for all, else drawn from the pool with ``generator``, training's
        guide generator by default)."""
        n = len(completions)
        if guides is None:
            guides = [guide] * n if guide is not None else self.guides.sample(n, generator or self.generator)
        queries = [
            build_correction_query(
                prompts[i // per_prompt], completions[i], self.guide_ids[g], engine.end_ids, self.think_ids
            )
            for i, g in enumerate(guides)
        ]
        return queries, guides

    def _turn2_texts(
        self, first_texts: list[str], guides: list[int], second: Generation
    ) -> tuple[list[str], list[bool]]:
        """The texts turn 2 is scored on under ``turn2_scoring``, and which keep turn 1's answer."""
        return turn2_texts(
            first_texts,
            [self.phrases[g] for g in guides],
            second.texts,
            self.config.turn2_scoring,
            lambda text: self.final_answer(text) is not None,
            self.config.guide_separator,
        )

    def _cap(
        self, verified: Tensor, owners: int | Tensor, cap: int | None, problems: Sequence[Problem], step: int, tag: str
    ) -> Tensor:
        """``verified`` cut to ``cap`` queries per problem (all of them when None); ``owners`` as in
        ``cap_per_problem``, ``tag`` names the per-problem draw."""
        if cap is None or (isinstance(owners, int) and cap >= owners):
            return verified
        generators: list[torch.Generator] | torch.Generator = self.generator
        if self.config.seed_per_problem:
            generators = [torch.Generator().manual_seed(self._problem_seed(step, p, tag)) for p in problems]
        return cap_per_problem(verified, owners, cap, generators)

    def _problem_seed(self, step: int, problem: Problem, tag: str) -> int:
        return zlib.crc32(f"{self.config.seed}/{step}/{problem.id}/{tag}".encode())
