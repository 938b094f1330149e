"""Calling a loader: its budget, its statistics and its event, in one place."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._checks import check_int
from .errors import ConfigurationError, LoadTimeout
from .metrics import Counters, Emitter
from .policy import Policy

__all__ = ("LoaderRunner",)

#: True while a loader runs behind the bulkhead: the loads it causes itself (a cached function
#: calling another) run within its slot, instead of waiting for one it may be keeping from them.
_IN_LOADER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "aiocacheguard_in_loader", default=False
)


class LoaderRunner:
    """
    Calls loaders for a Cache: counts each call and failure, bounds it by the policy's
    ``load_timeout`` (cancelling it then, and raising `LoadTimeout`), and reports a
    ``"loaded"`` event with its duration. The loader's own exceptions pass through untouched.
    With ``max_concurrent``, a bulkhead keeps the database from more loads at once across
    keys; a call that finds no slot within the policy's ``wait_timeout`` raises `LoadTimeout`.
    """

    __slots__ = ("counters", "emit", "limiter")

    def __init__(
        self, counters: Counters, emit: Emitter, *, max_concurrent: int | None = None
    ) -> None:
        if max_concurrent is not None:
            check_int("max_concurrent_loads", max_concurrent, minimum=1)
        #: The Cache's statistics and event hook, which the loads report to.
        self.counters = counters
        self.emit = emit
        #: The bulkhead: at most this many loader calls at once (anyio's CapacityLimiter, whose
        #: ``statistics()`` says how many run and how many wait), or None for no bound.
        self.limiter = None if max_concurrent is None else anyio.CapacityLimiter(max_concurrent)

    async def __call__(
        self, rkey: bytes, loader: Callable[[], Awaitable[Any]], policy: Policy, /
    ) -> Any:
        limiter = self.limiter
        if limiter is None or _IN_LOADER.get():  # a loader's own cached lookups: its slot
            return await self._call(rkey, loader, policy)
        try:
            with anyio.fail_after(policy.wait_timeout):
                await limiter.acquire()
        except TimeoutError:
            self.counters.bulkhead_timeouts += 1
            raise LoadTimeout(
                f"no loader slot came free within wait_timeout={policy.wait_timeout}s: "
                f"max_concurrent_loads={int(limiter.total_tokens)} loaders were running"
            ) from None
        entered = _IN_LOADER.set(True)
        try:
            return await self._call(rkey, loader, policy)
        finally:
            _IN_LOADER.reset(entered)
            limiter.release()

    async def _call(self, rkey: bytes, loader: Callable[[], Awaitable[Any]], policy: Policy) -> Any:
        counters = self.counters
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
            self.emit("loaded", rkey, error, duration=time.monotonic() - started)
