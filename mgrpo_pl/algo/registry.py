"""Variants chosen by name in the config, as verl's ``core_algos`` registers its advantage estimators and losses.

A registry maps a name to a function. The built-in variants register themselves where they are defined
(``algo.advantages``, ``algo.losses``); a user adds one under a new name from their own module, imported before the
run (e.g. the module that defines their reward), and names it in the YAML like a built-in:

    from mgrpo_pl.algo.losses import LOSS_AGGREGATIONS

    @LOSS_AGGREGATIONS.register("token-sum")
    def token_sum(masked, tokens_per_row, seqs, num_tokens, length):
        return masked.sum(), seqs.new_ones(())
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Generic, TypeVar

from mgrpo_pl.errors import ConfigError

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Functions by name. ``flag`` is the setting that names one, for error messages."""

    def __init__(self, what: str, flag: str) -> None:
        self.what, self.flag = what, flag
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.what} {name!r} is registered already")
            self._functions[name] = fn
            return fn

        return add

    def get(self, name: str | Enum) -> F:
        key = name.value if isinstance(name, Enum) else name
        if key not in self._functions:
            raise ConfigError(f"{self.flag} {key!r} is unknown; choose from {', '.join(self.names())}")
        return self._functions[key]

    def names(self) -> list[str]:
        return list(self._functions)

    def __contains__(self, name: object) -> bool:
        return (name.value if isinstance(name, Enum) else name) in self._functions
