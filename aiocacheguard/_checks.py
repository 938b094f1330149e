"""Argument checks shared by every constructor: a named error before any I/O."""

from __future__ import annotations

import math

from .errors import ConfigurationError

__all__ = ("check_int", "check_seconds")


def check_int(field: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    """``value`` is an int (not a bool) in ``[minimum, maximum]``."""
    accepted = (
        f"an integer >= {minimum}"
        if maximum is None
        else f"an integer from {minimum} to {maximum:,}".replace(",", "_")
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(field, value, accepted)
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigurationError(field, value, accepted)


def check_seconds(field: str, value: object, *, maximum: float = 365 * 24 * 3600.0) -> None:
    """``value`` is a finite number of seconds in ``(0, maximum]`` (not a bool)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and 0 < value <= maximum)
    ):
        raise ConfigurationError(field, value, f"seconds in (0, {maximum:g}]")
