"""Rule-based math reward on math-verify that cannot hang a training step.

``MathReward()(completions, answers)`` returns 1.0 where math-verify judges the completion's final answer equal to the
gold answer and 0.0 otherwise. Which text is the final answer is read by ``read_final_answer`` under the reward's
``answer_format`` (``mgrpo_pl/rewards/reading.py``: by default the value a completion ends on; an unevaluated expression
such as ``9 + 1`` is no answer and scores 0); math-verify judges only that text's equivalence. Gold answers may be GSM8K
solutions (``... #### 72``), MATH solutions (last ``\\boxed{...}``) or plain strings (``72``, ``\\frac{3}{4}``,
``x^2+1``); ``normalize_gold`` reduces them to the bare answer, which is wrapped in ``$...$`` because math-verify does
not parse raw LaTeX without delimiters. A boxed answer is parsed as ``\\boxed{...}``, any other as ``$...$``, and
``verify(gold, prediction)`` is called gold first, as its asymmetric rules (percent, units, sets) expect.

Why worker processes. Sympy comparisons of adversarial answers (``(2^{100000}+1)!``, power towers) can run for minutes,
and math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread: a Lightning training
step that scores from a callback thread would get a ``ValueError`` or, with timeouts disabled, no bound at all. So every
item is scored in a pebble ``ProcessPool`` worker, in that worker's main thread, under two limits:

* math-verify's own (soft) timeouts, ``max(1, timeout_s // 3)`` whole seconds per parse/compare (``signal.alarm``
  takes integers). They end most runaway cases while keeping the worker alive.
* a hard per-item limit of ``timeout_s`` enforced by pebble, which kills the worker and starts a replacement. It catches
  what the alarm cannot interrupt (long C calls, several slow steps in one item).

Either way the item scores 0 and is counted in ``stats()``. Workers that cannot start or keep running are not an item's
failure: a call in which a worker died is followed by a health check, and a pool that cannot score even the warm-up item
raises ``RewardError`` naming the cause, so a run never goes on with all-zero rewards. A call as a whole also has a
generous deadline (a backstop should the pool itself misbehave). The calling process runs no math-verify code and no
gold normalisation on untrusted text (its regexes once showed quadratic behaviour on long whitespace runs); the answer
reading it may run (``final_answer``) is a linear scan.

Start method: ``forkserver`` by default. ``fork`` would copy the training process, with its torch/OpenMP threads and
possibly a CUDA context, into every worker (forking a multi-threaded process can deadlock, and CUDA cannot be used
after fork). ``spawn`` and ``forkserver`` are both safe: workers start from a fresh, single-threaded interpreter.
``forkserver`` (the default on Linux from Python 3.14) is preferred: its workers are forks of a small server that is
meant to preload ``__main__``, so a replacement worker need not re-import the training script. Measured on Python 3.11
that preload does not take effect, so each new worker, under either method, re-runs the training script's imports
(torch included, ~2-3 s): paid at pool start and after each hard kill, never per item. Scripts need the usual
``if __name__ == "__main__":`` guard. The server is multiprocessing's, shared by the whole Python process; it stays up
after ``close()`` and exits with the process.

This module must not import torch at module level: the workers import it to unpickle the task function, and a torch
import costs each worker ~3 s at start and after every kill.

No integer fast path: reproducing math-verify's extraction for "plain integers" (several boxes become a set, ``5\\%``
matches 5 and 0.05, ``x=5`` matches 5, ``1e3`` reads as ``1\\cdot e\\cdot 3``, ``\\$5.`` outside a box parses to
nothing) would change results on exactly the cases a reward must get right, for a few ms per item on worker cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pebble import ProcessPool

from mgrpo_pl.rewards.base import Reward, RewardError
from mgrpo_pl.rewards.math_worker import ERROR, KILLED, NO_GOLD, TIMEOUT, WARMUP, init_worker, score_item
from mgrpo_pl.rewards.reading import AnswerFormat, FinalAnswer, check_answer_format, read_final_answer

if TYPE_CHECKING:
    import torch

__all__ = ["MathReward"]

logger = logging.getLogger(__name__)

# Worker start-up (imports + warm-up, ~3 s) and a replacement after a kill are not covered by pebble's per-task
# timeout; these allowances size the whole-call deadline, never a legitimate item's limit. Items still pending at the
# deadline mean the pool does not run, and the call raises RewardError.
_POOL_START_ALLOWANCE_S = 60.0
_RESTART_ALLOWANCE_S = 10.0

# What a user does about workers that cannot start (RewardError's second half).
_START_FIX = (
    "With start_method={start_method!r} every worker starts by importing the main script: put the script's code under "
    '`if __name__ == "__main__":`; where there is no script file to import (`python -`, some notebooks) use '
    'MathReward(start_method="fork") or run the code from a file.'
)


def _stop_pool(pool: ProcessPool) -> None:
    """Stop a pebble pool and wait until its workers have exited."""
    pool.stop()
    pool.join()


class MathReward(Reward):
    """math-verify reward, 1.0 for a correct final answer, scored in worker processes with a hard per-item timeout.

    Args:
        timeout_s: Hard wall-clock limit per item, in seconds; an item that exceeds it has its worker killed and
            scores 0. math-verify's own timeouts inside the worker are ``max(1, int(timeout_s // 3))`` seconds.
        num_workers: Worker processes. Each item is one task, so a call takes about
            ``ceil(N / num_workers)`` item-times.
        start_method: ``"forkserver"`` (default), ``"spawn"`` or ``"fork"``; see the module docstring for why
            ``fork`` is unsafe in a training process.
        answer_format: Which text of a completion is its final answer: ``value`` (default), ``boxed``,
            ``answer_line`` or ``math_verify`` (``mgrpo_pl/rewards/reading.py``). Turn 2 of self-correction reads
            corrections with the same rules (``final_answer``).

    The pool starts on the first call and is reused; ``close()`` (or leaving a ``with`` block, or garbage collection,
    or interpreter exit) stops it, and a later call starts a new one. Copies and unpickled instances share nothing
    with the original: the pool is left out of the pickled state and started again on demand.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        start_method: str = "forkserver",
        answer_format: AnswerFormat = "value",
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method {start_method!r} is not available here; choose from "
                f"{multiprocessing.get_all_start_methods()}"
            )
        self.answer_format = check_answer_format(answer_format)
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.start_method = start_method
        self._counts = {"scored": 0, "timeouts": 0, "killed": 0, "errors": 0, "gold_unparsed": 0}
        self._last_call_timeouts = 0
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPool | None = None
        self._finalizer: weakref.finalize | None = None

    def final_answer(self, text: str) -> FinalAnswer | None:
        """The final answer of ``text`` as this reward reads it (``read_final_answer`` under ``answer_format``)."""
        return read_final_answer(text, self.answer_format)

    @property
    def soft_timeout_s(self) -> int:
        """Whole seconds given to each of math-verify's own parse/compare timeouts inside a worker."""
        return max(1, int(self.timeout_s // 3))

    def __call__(self, completions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Score each completion against its gold answer.

        Args:
            completions: N generated texts.
            answers: N gold answers (GSM8K ``#### N`` solutions, MATH ``\\boxed{}`` solutions or plain strings;
                non-strings are converted with ``str``).

        Returns:
            float32 tensor ``[N]`` of 0.0/1.0. Items that time out or fail score 0.0 and are counted in ``stats()``.

        Raises:
            ValueError: If ``completions`` and ``answers`` differ in length.
        """
        import torch  # deferred: see the module docstring (workers import this module)

        if len(completions) != len(answers):
            raise ValueError(
                f"completions and answers must have the same length, got {len(completions)} completions "
                f"and {len(answers)} answers"
            )
        if len(completions) == 0:
            with self._lock:
                self._last_call_timeouts = 0
            return torch.zeros(0, dtype=torch.float32)
        scores, outcomes = self._score_all([str(c) for c in completions], [str(a) for a in answers])
        self._record(outcomes)
        no_gold = [str(a) for a, outcome in zip(answers, outcomes) if outcome == NO_GOLD]
        if no_gold:
            # Not silent: such a problem scores 0 whatever the model writes, i.e. it is lost to training.
            logger.warning(
                "MathReward: math-verify cannot parse the gold answer of %d of %d items, so they score 0 (a data "
                "problem; first gold: %r)",
                len(no_gold),
                len(outcomes),
                no_gold[0][:200],
            )
        return torch.tensor(scores, dtype=torch.float32)

    def _score_all(self, completions: list[str], answers: list[str]) -> tuple[list[float], list[str]]:
        pool = self._ensure_pool()
        soft = self.soft_timeout_s
        futures = [
            pool.schedule(score_item, args=(completion, answer, soft, self.answer_format), timeout=self.timeout_s)
            for completion, answer in zip(completions, answers, strict=True)
        ]
        waves = -(-len(futures) // self.num_workers)
        deadline = time.monotonic() + _POOL_START_ALLOWANCE_S + waves * (self.timeout_s + _RESTART_ALLOWANCE_S)
        scores = [0.0] * len(futures)
        outcomes = [ERROR] * len(futures)
        first_error: BaseException | None = None
        unscored = 0
        for i, future in enumerate(futures):
            try:
                scores[i], outcomes[i] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if not future.done():
                    # Our whole-call backstop rather than pebble's per-item limit; cancelling kills the worker.
                    future.cancel()
                    unscored += 1
                outcomes[i] = KILLED
            except Exception as error:
                # ProcessExpired: the worker died (segfault, OOM kill, a script that fails when a worker imports it);
                # CancelledError: close() from another thread.
                outcomes[i] = ERROR
                first_error = first_error or error
        if unscored:
            # Each item has a hard limit of timeout_s, so items still pending at the whole-call deadline mean the pool
            # itself does not run (seen under load: workers that die at start are respawned until the deadline).
            self.close()
            raise RewardError(
                f"MathReward's worker processes cannot start or keep running: {unscored} of {len(futures)} items were "
                f"still unscored at the call's deadline, although each has a {self.timeout_s:g} s limit. "
                + _START_FIX.format(start_method=self.start_method)
            )
        if first_error is not None:
            self._check_workers(first_error)
            # Not silent: a systematic failure would otherwise look like a model that never answers correctly.
            logger.warning(
                "MathReward: %d of %d items could not be scored and score 0 (first error: %r)",
                outcomes.count(ERROR),
                len(outcomes),
                first_error,
            )
        return scores, outcomes

    def _check_workers(self, error: BaseException) -> None:
        """Raise ``RewardError`` when the pool cannot score even the warm-up item: its workers cannot start or stay up.

        A single worker lost to one pathological item (an out-of-memory kill) passes this check and costs only that
        item; a pool whose every worker dies at start would otherwise score every completion 0 for the whole run.
        """
        probe = self._schedule_warmup_item()
        try:
            probe.result(timeout=_POOL_START_ALLOWANCE_S)
            return
        except Exception as probe_error:
            cause = probe_error
        self.close()
        raise RewardError(
            f"MathReward's worker processes cannot start or keep running ({cause!r}; first failed item: {error!r}). "
            + _START_FIX.format(start_method=self.start_method)
        ) from error

    def _record(self, outcomes: list[str]) -> None:
        killed = outcomes.count(KILLED)
        timeouts = outcomes.count(TIMEOUT) + killed
        with self._lock:
            self._counts["scored"] += len(outcomes)
            self._counts["timeouts"] += timeouts
            self._counts["killed"] += killed
            self._counts["errors"] += outcomes.count(ERROR)
            self._counts["gold_unparsed"] += outcomes.count(NO_GOLD)
            self._last_call_timeouts = timeouts

    def stats(self) -> dict[str, int]:
        """Counters for logging.

        Returns:
            ``scored``: items scored so far; ``timeouts``: items that hit a time limit (math-verify's own or the hard
            one); ``killed``: of those, items whose worker had to be killed; ``errors``: items whose scoring raised
            or whose worker died; ``gold_unparsed``: items whose gold answer math-verify could not parse (a data
            problem: they always score 0); ``last_call_timeouts``: ``timeouts`` of the most recent call alone.
            All but the last are cumulative since construction.
        """
        with self._lock:
            return {**self._counts, "last_call_timeouts": self._last_call_timeouts}

    def _ensure_pool(self) -> ProcessPool:
        with self._lock:
            if self._pool is not None and not self._pool.active:
                # pebble marks a pool whose manager threads died as inactive; replace it rather than fail forever.
                self._discard_pool_locked()
            if self._pool is None:
                context = multiprocessing.get_context(self.start_method)
                self._pool = ProcessPool(max_workers=self.num_workers, initializer=init_worker, context=context)
                # Holds the pool, not self, so an abandoned reward is collected and its workers stopped.
                self._finalizer = weakref.finalize(self, _stop_pool, self._pool)
            return self._pool

    def _discard_pool_locked(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_pool once and detaches
        self._pool = None
        self._finalizer = None

    def start(self) -> None:
        """Start the workers now instead of on the first call, e.g. while the model loads. Optional; returns at once."""
        # pebble starts a pool's workers on its first task: a throwaway warm-up item does that without waiting.
        self._schedule_warmup_item()

    def _schedule_warmup_item(self):  # noqa: ANN202 - a pebble future
        """Schedule one known-good item; its future tells whether the pool can score at all."""
        return self._ensure_pool().schedule(
            score_item, args=(WARMUP[0][0], WARMUP[0][1], 1, "value"), timeout=self.timeout_s
        )

    def close(self) -> None:
        """Stop the worker processes and wait for them to exit. Safe to call twice; a later call restarts them."""
        with self._lock:
            self._discard_pool_locked()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_lock", "_pool", "_finalizer"):
            state.pop(key, None)
        state["_counts"] = dict(self._counts)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(timeout_s={self.timeout_s}, num_workers={self.num_workers}, "
            f"start_method={self.start_method!r}, answer_format={self.answer_format!r})"
        )
