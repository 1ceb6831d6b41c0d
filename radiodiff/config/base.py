"""Config errors and the checks every schema uses."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A configuration value a user set is invalid; the message names the key."""


def check_choice(key: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; expected one of {', '.join(map(str, choices))}")


def check_positive(key: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
