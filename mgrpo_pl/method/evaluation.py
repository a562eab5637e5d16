"""The multi-turn evaluation: turn 1 answers each problem, turn 2 continues ``q ⊕ o ⊕ guide`` (or asks in a new user
turn), and both turns are scored, giving Acc@t1, Acc@t2 and the i->c / c->i transitions per problem. With
``eval_turns`` N > 2, turns 3..N each continue the previous one the same way.

Evaluation draws from no stream training uses: its results do not depend on when in training it runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mgrpo_pl.method.parts import RolloutParts
from mgrpo_pl.rewards.reading import FinalAnswer
from mgrpo_pl.rollout.engines.base import GenerationEngine
from mgrpo_pl.rollout.types import EvalBatch, Generation

if TYPE_CHECKING:
    from mgrpo_pl.data.loaders import Problem


class TwoTurnEvaluator(RolloutParts):
    """``evaluate``: both turns of every problem, scored, with one record per (problem, sample) for auditing."""

    def _new_turn_query(self, problem: Problem, answer: str | Sequence[str]) -> list[int]:
        """The conversation user(q), then assistant(o_j), user(eval_guide) for each earlier turn's answer, ready for
        the assistant's next turn."""
        c = self.config
        if not self.tokenizer.chat_template:
            raise ValueError("--data.rollout.eval_turn2=new_turn needs a tokenizer with a chat template")
        messages = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        question = f"{problem.question}\n{c.instruction}" if c.instruction else problem.question
        messages.append({"role": "user", "content": question})
        for text in [answer] if isinstance(answer, str) else answer:
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": c.eval_guide}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, engine: GenerationEngine, problems: Sequence[Problem]) -> EvalBatch:
        """Turn 1 answers each problem; turn 2 continues ``q ⊕ o ⊕ guide`` (or asks in a new user turn); both turns
        are scored."""
        # Evaluation samples, and draws any guide phrase, from its own seeded streams: results do not depend on when
        # in training it runs, and it leaves training's RNG and guide generator untouched (exact resume).
        seed = self.config.seed + zlib.crc32(problems[0].id.encode()) if problems else self.config.seed
        with torch.random.fork_rng(), engine.reuse_prefixes():  # turn 2 starts with turn 1's sequences
            torch.manual_seed(seed)
            return self._evaluate(engine, problems, torch.Generator().manual_seed(seed))

    def _evaluate(self, engine: GenerationEngine, problems: Sequence[Problem], generator: torch.Generator) -> EvalBatch:
        c = self.config
        k = c.eval_samples
        prompts = self.encode(problems)
        answers = [p.answer for p in problems for _ in range(k)]
        flag = "--data.rollout.eval_sampling.max_new_tokens"
        labels = [f"problem {p.id!r} ({p.source or 'no source'})" for p in problems]
        self._check_context(engine, prompts, c.eval_sampling.max_new_tokens, labels, flag)
        first = engine.generate(prompts, c.eval_sampling, n=k)
        r1 = self._score(first.texts, answers)
        if c.eval_turn2 == "new_turn":
            queries = [self._new_turn_query(problems[i // k], first.texts[i]) for i in range(len(first))]
            guides = [self.eval_guide_index] * len(first)
        else:
            queries, guides = self._queries(
                engine, prompts, first.token_ids, k, self.eval_guide_index, generator=generator
            )
        turn2_labels = [f"turn-2 query of {labels[i // k]}" for i in range(len(queries))]
        self._check_context(engine, queries, c.eval_sampling.max_new_tokens, turn2_labels, flag)
        second = engine.generate(queries, c.eval_sampling, n=1)
        scored, kept_t1 = self._turn2_texts(first.texts, guides, second)
        r2 = self._score(scored, answers)
        ok1, ok2 = r1 >= c.correct_threshold, r2 >= c.correct_threshold
        read1 = [self.final_answer(t) for t in first.texts]
        # The answer turn 2 was judged on, for auditing a transition (the whole text for the ``full`` reading).
        read2 = [read1[i] if kept_t1[i] else self.final_answer(scored[i]) for i in range(len(scored))]
        records = [
            {
                "problem_id": problems[i // k].id,
                "sample": i % k,
                "question": problems[i // k].question,
                "answer": problems[i // k].answer,
                "turn1": first.texts[i],
                "turn2": second.texts[i],
                "guide": self.phrases[guides[i]],
                "answer_t1": _answer_text(read1[i]),
                "answer_t2": _answer_text(read2[i]),
                "answer_t2_from": "turn1" if kept_t1[i] else "turn2",
                "turn2_scoring": c.turn2_scoring,
                # False: cut at max_new_tokens (a truncated correction is one of the audit's categories)
                "finished_t1": bool(first.finished[i]),
                "finished_t2": bool(second.finished[i]),
                "correct_t1": bool(ok1[i]),
                "correct_t2": bool(ok2[i]),
            }
            for i in range(len(answers))
        ]
        later = self._later_turns(engine, problems, queries, second, scored, read2, kept_t1, records, generator)
        return EvalBatch(
            problem_ids=[problems[i // k].id for i in range(len(answers))],
            correct_t1=ok1,
            correct_t2=ok2,
            records=records,
            correct_later=later,
        )

    def _later_turns(
        self,
        engine: GenerationEngine,
        problems: Sequence[Problem],
        queries: list[list[int]],
        previous: Generation,
        scored: list[str],
        read: list[FinalAnswer | None],
        kept: list[bool],
        records: list[dict[str, object]],
        generator: torch.Generator,
    ) -> list[Tensor]:
        """Turns 3..``eval_turns``: turn t continues turn t-1's query and answer with the guide phrase again (or asks
        once more in a new user turn), and is scored as turn 2 is, against turn t-1's judged text. Adds each turn's
        fields to ``records``; returns each turn's correctness."""
        c = self.config
        k = c.eval_samples
        flag = "--data.rollout.eval_sampling.max_new_tokens"
        sources = ["turn1" if kept[i] else "turn2" for i in range(len(records))]
        texts = [[str(r["turn1"]), str(r["turn2"])] for r in records]
        answers = [p.answer for p in problems for _ in range(k)]
        correct: list[Tensor] = []
        for turn in range(3, c.turns + 1):
            if c.eval_turn2 == "new_turn":
                queries = [self._new_turn_query(problems[i // k], texts[i]) for i in range(len(records))]
                guides = [self.eval_guide_index] * len(records)
            else:  # q ⊕ o_1 ⊕ guide ⊕ ... ⊕ o_{t-1} ⊕ guide, one assistant turn
                queries, guides = self._queries(
                    engine, queries, previous.token_ids, 1, self.eval_guide_index, generator=generator
                )
            labels = [f"turn-{turn} query of problem {problems[i // k].id!r}" for i in range(len(queries))]
            self._check_context(engine, queries, c.eval_sampling.max_new_tokens, labels, flag)
            previous = engine.generate(queries, c.eval_sampling, n=1)
            scored, kept = self._turn2_texts(scored, guides, previous)
            ok = self._score(scored, answers) >= c.correct_threshold
            read = [read[i] if kept[i] else self.final_answer(scored[i]) for i in range(len(scored))]
            for i, record in enumerate(records):
                sources[i] = sources[i] if kept[i] else f"turn{turn}"
                texts[i].append(previous.texts[i])
                record.update(
                    {
                        f"turn{turn}": previous.texts[i],
                        f"answer_t{turn}": _answer_text(read[i]),
                        f"answer_t{turn}_from": sources[i],
                        f"finished_t{turn}": bool(previous.finished[i]),
                        f"correct_t{turn}": bool(ok[i]),
                    }
                )
            correct.append(ok)
        return correct


def _answer_text(answer: FinalAnswer | None) -> str | None:
    """A read answer as the per-problem records show it: its text, marked when it is an unevaluated expression."""
    if answer is None:
        return None
    return f"{answer.text} (unevaluated)" if answer.unevaluated else answer.text
