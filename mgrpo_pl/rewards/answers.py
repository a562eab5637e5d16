"""Gold-answer normalisation shared by the reward and the dataset loaders.

Datasets state their gold answers in three shapes: GSM8K's worked solution ending in ``#### 72``, MATH-style
solutions whose final answer sits in the last ``\\boxed{...}``, and plain strings (``72``, ``\\frac{3}{4}``).
These helpers reduce all three to the bare answer text; the reward then wraps it for math-verify.
"""

from __future__ import annotations

_GSM8K_MARK = "####"
_BOXED_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Returns None when there is no complete boxed expression (an unclosed brace counts as none).
    """
    start = max(text.rfind(cmd) for cmd in _BOXED_COMMANDS)
    if start < 0:
        return None
    open_at = text.find("{", start)
    # `\boxed 5` (no braces) is legal LaTeX: take the next token.
    between = text[start:open_at] if open_at >= 0 else text[start:]
    if open_at < 0 or between.strip() not in _BOXED_COMMANDS:
        tail = text[start:].split(None, 1)
        rest = tail[1] if len(tail) > 1 else ""
        token = rest.split()[0] if rest.split() else ""
        return token.rstrip("$.") or None
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def gsm8k_final_answer(text: str) -> str | None:
    """Return the answer after GSM8K's (last) ``####`` marker, with thousands separators removed, or None."""
    # str.rfind, not a lazy regex: `####\s*(.+?)\s*$` took seconds on a long whitespace run (quadratic backtracking).
    at = text.rfind(_GSM8K_MARK)
    if at < 0:
        return None
    return text[at + len(_GSM8K_MARK) :].strip().replace(",", "").strip() or None


def normalize_gold(answer: str) -> str:
    """Reduce a gold answer in any of the three accepted shapes to its bare final-answer text.

    Order matters: the last box wins over a GSM8K marker (GSM8K solutions contain no boxes, but a MATH solution can
    contain ``####`` in a Markdown heading or inside code), then the ``####`` marker, then the stripped string.
    """
    boxed = last_boxed_content(answer)
    if boxed is not None:
        return boxed.strip()
    gsm = gsm8k_final_answer(answer)
    if gsm is not None:
        return gsm
    return answer.strip()
