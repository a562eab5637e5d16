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
        # One table of phrases: the training pool, then the fixed evaluation phrase when one is set.
        self.phrases = list(self.guides.phrases) + ([config.eval_guide] if config.eval_guide is not None else [])
        self.eval_guide_index = len(self.guides) if config.eval_guide is not None else None
        sep = config.guide_separator
        self.guide_ids = [tokenizer(sep + p, add_special_tokens=False)["input_ids"] for p in self.phrases]
        self.think_ids = (
            tokenizer(config.think_close, add_special_tokens=False)["input_ids"] if config.think_close else []
        )

    # -- shared pieces ------------------------------------------------------------------------------------------
    def encode(self, problems: Sequence[Problem]) -> list[list[int]]:
        c = self.config
        return [encode_prompt(self.tokenizer, p.question, c.instruction, c.system_prompt) for p in problems]

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

    def _queries(
        self,
        engine: GenerationEngine,
        prompts: list[list[int]],
        first: Generation,
        per_prompt: int,
        guide: int | None,
        guides: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[list[int]], list[int]]:
        """Correction queries for every layer-1 sample, with the guide index used for each (``guides`` when given,
        else ``guide`` for all, else drawn from the pool with ``generator``, training's guide generator by default)."""
        n = len(first)
        if guides is None:
            guides = [guide] * n if guide is not None else self.guides.sample(n, generator or self.generator)
        queries = [
            build_correction_query(
                prompts[i // per_prompt], first.token_ids[i], self.guide_ids[g], engine.end_ids, self.think_ids
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

    def _cap(self, verified: Tensor, problems: Sequence[Problem], step: int) -> Tensor:
        """``verified`` cut to ``max_kept_per_problem`` queries per problem (all of them when unset)."""
        cap, G = self.config.max_kept_per_problem, self.config.num_generations
        if cap is None or cap >= G:
            return verified
        generators: list[torch.Generator] | torch.Generator = self.generator
        if self.config.seed_per_problem:
            generators = [torch.Generator().manual_seed(self._problem_seed(step, p, "cap")) for p in problems]
        return cap_per_problem(verified, G, cap, generators)

    def _problem_seed(self, step: int, problem: Problem, tag: str) -> int:
        return zlib.crc32(f"{self.config.seed}/{step}/{problem.id}/{tag}".encode())
