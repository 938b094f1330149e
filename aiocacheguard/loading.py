"""Calling a loader: its budget, its statistics and its event, in one place."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ConfigurationError, LoadTimeout
from .metrics import Counters, Emitter
from .policy import Policy

__all__ = ("LoaderRunner",)


class LoaderRunner:
    """
    Calls loaders for a Cache: counts each call and failure, bounds it by the policy's
    ``load_timeout`` (cancelling it then, and raising `LoadTimeout`), and reports a
    ``"loaded"`` event with its duration. The loader's own exceptions pass through untouched.
    """

    __slots__ = ("_counters", "_emit")

    def __init__(self, counters: Counters, emit: Emitter) -> None:
        self._counters = counters
        self._emit = emit

    async def __call__(
        self, rkey: bytes, loader: Callable[[], Awaitable[Any]], policy: Policy, /
    ) -> Any:
        counters = self._counters
        counters.loader_calls += 1
        started = time.monotonic()
        error: BaseException | None = None
        try:
            pending = loader()
            if not inspect.isawaitable(pending):
                raise ConfigurationError(
                    "loader", loader, "an async function: it returned a non-awaitable"
                )
            if policy.load_timeout is None:
                return await pending
            budget = asyncio.timeout(policy.load_timeout)
            try:
                async with budget:
                    return await pending
            except TimeoutError:
                if not budget.expired():
                    raise  # the loader's own TimeoutError
                raise LoadTimeout(
                    f"the loader ran longer than load_timeout={policy.load_timeout}s and was "
                    "cancelled; raise Policy.load_timeout if it is legitimately slow"
                ) from None
        except Exception as exc:
            counters.loader_errors += 1
            error = exc
            raise
        finally:
            self._emit("loaded", rkey, error, duration=time.monotonic() - started)
