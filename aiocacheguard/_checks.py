"""
Argument checks shared by every constructor: a named error before any I/O.

The one implementation of "an int (or a finite real number), not a bool, in range": a bool is
an int to Python, but ``ttl=True`` or ``capacity=True`` is always a mistake. Each check raises
`ConfigurationError`, whose message names the field, the value and the accepted range.
"""

from __future__ import annotations

import math

from ._types import Serializer
from .errors import ConfigurationError

__all__ = ("check_instance", "check_int", "check_number", "check_seconds", "check_serializer")


def check_int(field: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    """
    ``value`` is an int (not a bool) in ``[minimum, maximum]``.

    Example:
        >>> check_int("batch", 0, minimum=1)
        Traceback (most recent call last):
        ...
        aiocacheguard.errors.ConfigurationError: batch=0 is not accepted: an integer >= 1
    """
    accepted = (
        f"an integer >= {minimum}"
        if maximum is None
        else f"an integer from {minimum} to {maximum:,}".replace(",", "_")
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(field, value, accepted)
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigurationError(field, value, accepted)


def check_number(
    field: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    accepted: str | None = None,
) -> None:
    """
    ``value`` is a finite int or float (not a bool) within the bounds given.

    Args:
        field: The name the error gives.
        value: What was passed.
        above, at_least: The lower bound, exclusive or inclusive (at most one of them).
        below, at_most: The upper bound, exclusive or inclusive (at most one of them).
        accepted: The error's description of the range, where the caller says it better
            (units, an example); by default the bounds, e.g. "a number > 0 and < 0.5".

    Example:
        >>> check_number("error_rate", 0.5, above=0, below=0.5)
        Traceback (most recent call last):
        ...
        aiocacheguard.errors.ConfigurationError: error_rate=0.5 is not ...: a number > 0 and < 0.5
    """
    if accepted is None:
        bounds = [
            f"{sign} {bound:g}"
            for sign, bound in ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
            if bound is not None
        ]
        accepted = "a number " + " and ".join(bounds) if bounds else "a finite number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (above is not None and value <= above)
        or (at_least is not None and value < at_least)
        or (below is not None and value >= below)
        or (at_most is not None and value > at_most)
    ):
        raise ConfigurationError(field, value, accepted)


def check_seconds(field: str, value: object, *, maximum: float = 365 * 24 * 3600.0) -> None:
    """``value`` is a finite number of seconds in ``(0, maximum]`` (not a bool)."""
    check_number(field, value, above=0, at_most=maximum, accepted=f"seconds in (0, {maximum:g}]")


def check_instance(field: str, value: object, kind: type, *, optional: bool = False) -> None:
    """``value`` is a ``kind`` (or None, if ``optional``)."""
    if not (isinstance(value, kind) or (optional and value is None)):
        accepted = f"an aiocacheguard.{kind.__name__}" + (" or None" if optional else "")
        raise ConfigurationError(field, value, accepted)


def check_serializer(serializer: object) -> None:
    """``serializer`` has ``dumps``, ``loads`` and a one-byte ``tag``."""
    if not isinstance(serializer, Serializer) or not 0 <= serializer.tag <= 255:
        raise ConfigurationError(
            "serializer", serializer, "an object with dumps, loads and a tag in 0..255"
        )
