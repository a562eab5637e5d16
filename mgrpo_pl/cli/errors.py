"""How ``mgrpo`` reports a user's mistake: one message that names the file, flag or key and the fix, no traceback.

A wrong key gets the closest valid ones as suggestions instead of jsonargparse's page-long usage text.
``--debug`` (or ``MGRPO_DEBUG=1``) shows the full usage and tracebacks again.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

DEBUG_ENV = "MGRPO_DEBUG"
DEBUG_FLAG = "--debug"
# Exit statuses: 2 for bad input (as argparse uses), 128 + 15 when stopped by SIGTERM (as a shell reports it).
EXIT_INPUT, EXIT_SIGTERM = 2, 143


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether tracebacks were asked for (the flag or the environment variable), and ``argv`` without the flag."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0"), rest


def fail(message: str, hint: str = f" ({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback)") -> NoReturn:
    """Print ``message`` as mgrpo's one-line error and exit with the bad-input status."""
    sys.stderr.write(f"mgrpo: error: {message}{hint}\n")
    raise SystemExit(EXIT_INPUT)


def _keys(parser: Any, prefix: str = "") -> Iterator[str]:
    """Every option a parser (and its nested parsers) accepts, as dotted keys."""
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", "")
        if dest and dest not in ("help", "config", "==SUPPRESS=="):
            yield prefix + dest
        for name, sub in getattr(action, "_name_parser_map", {}).items():
            yield from _keys(sub, f"{prefix}{name}.")


def suggestion(message: str, parser: Any) -> str:
    """``" Did you mean ...?"`` for the unknown key that ``message`` quotes, or ``""``."""
    match = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --([\w.]+)", message)
    if not match:
        return ""
    wrong = match.group(1) or match.group(2)
    keys = sorted(set(_keys(parser)))
    close = difflib.get_close_matches(wrong, keys, n=3, cutoff=0.75)
    if not close:  # a misspelt last part: compare within the same section
        section, _, leaf = wrong.rpartition(".")
        leaves = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6)]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class MGRPOArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line with a suggestion, unless ``debug`` is set."""

    debug = False

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or self.debug or debug_requested([])[0]:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        # The subcommand from the parser's prog ("<script> [options] fit"); the script is `mgrpo` whatever runs it.
        command = " ".join(["mgrpo", *parser.prog.replace(" [options]", "").split()[1:]])
        fail(f"{message}.{suggestion(message, parser)} `{command} --help` lists the options.", hint="")
