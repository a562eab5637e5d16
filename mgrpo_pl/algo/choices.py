"""A string enum for variants chosen by name in the config (advantage scaling, loss aggregation, ...)."""

from __future__ import annotations

from enum import Enum

from mgrpo_pl.errors import ConfigError


class NamedChoice(str, Enum):
    """Members are config names; ``parse`` turns a name into a member with an error that lists the valid ones."""

    @classmethod
    def parse(cls, value: NamedChoice | str) -> NamedChoice:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ConfigError(f"Unknown {cls.__name__} {value!r}; valid names are {choices}.") from None
