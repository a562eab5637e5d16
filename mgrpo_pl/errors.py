"""The errors a user can act on.

``mgrpo`` prints an ``InputError`` as one message, without a traceback (``--debug`` or ``MGRPO_DEBUG=1`` shows it),
and exits with status 2: the message is the whole story (the file and line, or the flag, and the fix). Any other
exception is a bug or an environment failure and keeps its traceback.

They are ``ValueError`` subclasses, so code that catches ``ValueError`` around a loader or a constructor keeps
working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used as given: bad data, a contradictory setting, an unreadable checkpoint."""


class ConfigError(InputError):
    """A setting (config key or flag) that is out of range or contradicts another; the message names the flag."""


class CheckpointError(InputError):
    """A ``--ckpt_path`` file that cannot be read, or that contradicts the command line; the message names it."""
