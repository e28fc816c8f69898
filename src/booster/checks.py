"""ConfigError and the one-line range checks of every settings dataclass.

Below both ``config.py`` and the defences, whose settings dataclasses live in their own
files and check their own ranges with these.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and how to fix it."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def one_of(value: str, allowed: list[str] | tuple[str, ...], key: str) -> None:
    check(value in allowed, f"{key}={value!r} is not known; choose one of: {', '.join(allowed)}")
