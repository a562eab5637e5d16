"""Problems checked against the model's context when the data is set up, before any compute.

A prompt that cannot fit with its generation budget would otherwise stop a run at the step that first draws it,
hours in on a real dataset. Under a set's ``on_error: skip`` such problems are dropped, counted and listed like any
other bad row; otherwise the first one stops the run with its file, line and the flag to change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mgrpo_pl.data.problems import DatasetError, OnError, Problem, SkipReport

log = logging.getLogger(__name__)


def _origin(problem: Problem, fallback: str) -> tuple[str, int | None]:
    """``(file, line)`` from ``Problem.source`` (``"<path>:<line>"``); the set's name when there is none."""
    path, _, line = problem.source.rpartition(":")
    return (path, int(line)) if path and line.isdigit() else (problem.source or fallback, None)


def fit_to_context(
    problems: Sequence[Problem],
    prompt_lengths: Sequence[int],
    budget: int,
    context: int | None,
    *,
    flag: str,
    on_error: OnError,
    set_name: str,
) -> list[Problem]:
    """The problems whose prompt plus ``budget`` generated tokens fit ``context`` tokens.

    Args:
        problems: One problem set.
        prompt_lengths: Each problem's prompt, in tokens, as the rollout encodes it.
        budget: Tokens the deepest query adds after the prompt, completion included (``RolloutParts.context_budget``).
        context: The model's context in tokens; None (unknown) keeps every problem.
        flag: The settings that ``budget`` comes from, for the message.
        on_error: ``"raise"`` stops at the first problem that does not fit; ``"skip"`` drops and reports them all.
        set_name: The set's name, for problems without a file.

    Raises:
        DatasetError: under ``on_error="raise"``, naming the problem's file and line, its length and the flag.
    """
    if context is None:
        return list(problems)
    report = SkipReport()
    kept: list[Problem] = []
    for problem, length in zip(problems, prompt_lengths, strict=True):
        if length + budget <= context:
            kept.append(problem)
            continue
        path, line = _origin(problem, set_name)
        err = DatasetError(
            path,
            f"problem {problem.id!r}: {length} prompt tokens + {budget} for {flag} exceed the model's context of "
            f"{context} tokens; shorten it, lower those settings, or add `on_error: skip` to the set's options to "
            "drop such problems",
            line=line,
        )
        if on_error == "raise":
            raise err
        report.errors.append(err)
    if report.count:
        log.warning("%s: %s", set_name, report.summary().replace("row(s)", "problem(s) longer than the context"))
    if not kept:
        raise DatasetError(
            set_name, f"no problem fits the model's context of {context} tokens with {budget} for {flag}"
        )
    return kept
