"""
Calling a loader: its budget, its statistics and its event, in one place; and the bulkhead.

The bulkhead (``Cache(max_concurrent_loads=N)``) is an `anyio.CapacityLimiter` of N tokens. A
load started from outside any loader takes a token, a *slot*, before its loader is called. A
load its loader causes (a cached function calling another, at any depth, in the loader's own
task or in tasks it starts) runs under that slot without taking another, and the slot is given
back when the load *and every load it caused* have ended: so at most N top-level loads run at
once, each with the loads it caused. A nested load never waits for a token, so it can never wait
for one its own parent holds.

One case would still wait for the parent's own token: a loader asks for a key whose flight was
started by a caller outside any loader and is waiting for a token. The nested caller then lends
its slot to that flight (`LoaderRunner.lend`): the flight runs under the slot it would otherwise
wait for.

Guarantees:
    - At most ``max_concurrent_loads`` slots are taken at once; every loader call runs under
      one, from its start to its end.
    - A load caused by a loader never waits for the bulkhead.
    - A load that finds no slot within the policy's ``wait_timeout`` raises `LoadTimeout`
      (counted in ``bulkhead_timeouts``), and takes none later.

Limitations:
    - The bound is on top-level loads: a loader that gathers 8 cached lookups that all miss
      runs 8 loads under its slot, so the database can see ``N x (1 + the loads each
      causes)`` queries at once. Bound a fan-out inside the loader if it matters.
    - A slot is kept while a load its loader caused runs on after the loader returned (a flight
      other callers joined): the slot is free again only when that load ends too.
    - A background task started from inside a loader carries its slot: a load it starts while
      the slot is held runs under it, one started later takes a slot of its own.
"""

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


class _Slot:
    """
    One token of the bulkhead (its borrower in the `anyio.CapacityLimiter`), held by a
    top-level load and lent to every load it causes; given back when the last of them ends.
    """

    __slots__ = ("_limiter", "held", "users")

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self._limiter = limiter
        self.held = False  # the token is taken (and not yet given back)
        self.users = 0  # loads running under it

    def enter(self) -> None:
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.held = False
            self._limiter.release_on_behalf_of(self)


#: The slot of the load whose loader is running (in its task and in the tasks it starts):
#: the loads it causes run under it.
_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "aiocacheguard_slot", default=None
)


class LoaderRunner:
    """
    Calls loaders for a Cache: counts each call and failure, bounds it by the policy's
    ``load_timeout`` (cancelling it then, and raising `LoadTimeout`), and reports a
    ``"loaded"`` event with its duration. The loader's own exceptions pass through untouched.
    With ``max_concurrent``, a bulkhead keeps the database from more top-level loads at once
    across keys (see the module's docstring for nested loads); a load that finds no slot within
    the policy's ``wait_timeout`` raises `LoadTimeout`.
    """

    __slots__ = ("_lenders", "_waiting", "counters", "emit", "limiter")

    def __init__(
        self, counters: Counters, emit: Emitter, *, max_concurrent: int | None = None
    ) -> None:
        if max_concurrent is not None:
            check_int("max_concurrent_loads", max_concurrent, minimum=1)
        #: The Cache's statistics and event hook, which the loads report to.
        self.counters = counters
        self.emit = emit
        #: The bulkhead: at most this many slots at once (anyio's CapacityLimiter, whose
        #: ``statistics()`` says how many are taken and how many loads wait), or None.
        self.limiter = None if max_concurrent is None else anyio.CapacityLimiter(max_concurrent)
        # Loads waiting for a slot, by key: a slot lent to the key ends the wait.
        self._waiting: dict[bytes, asyncio.Future[_Slot]] = {}
        # Slots of callers inside a loader waiting for the flight of a key, by key.
        self._lenders: dict[bytes, list[_Slot]] = {}

    def statistics(self) -> dict[str, int]:
        """The bulkhead's share of a Cache's statistics: slots taken, loads waiting."""
        limiter = self.limiter
        if limiter is None:
            return {}
        statistics = limiter.statistics()
        return {
            "loads_running": statistics.borrowed_tokens,
            "loads_waiting": statistics.tasks_waiting,
        }

    def lend(self, rkey: bytes) -> Callable[[], None] | None:
        """
        A caller is about to wait for the flight of ``rkey``: if it runs inside a loader, the
        flight may run under its slot rather than wait for another (see the module's
        docstring). Returns what to call when the caller stops waiting, or None.
        """
        slot = _SLOT.get()
        if slot is None or not slot.held:
            return None
        waiting = self._waiting.get(rkey)
        if waiting is not None and not waiting.done():
            waiting.set_result(slot)
        lenders = self._lenders.setdefault(rkey, [])
        lenders.append(slot)

        def done() -> None:
            lenders.remove(slot)
            if not lenders and self._lenders.get(rkey) is lenders:
                del self._lenders[rkey]

        return done

    async def __call__(
        self, rkey: bytes, loader: Callable[[], Awaitable[Any]], policy: Policy, /
    ) -> Any:
        limiter = self.limiter
        if limiter is None:
            return await self._call(rkey, loader, policy)
        slot = _SLOT.get()
        if slot is None or not slot.held:  # a top-level load, or its parent's slot is gone
            slot = await self._take(limiter, rkey, policy)
        slot.enter()
        entered = _SLOT.set(slot)
        try:
            return await self._call(rkey, loader, policy)
        finally:
            _SLOT.reset(entered)
            slot.leave()

    async def _take(self, limiter: anyio.CapacityLimiter, rkey: bytes, policy: Policy) -> _Slot:
        """
        A slot lent to ``rkey``, else one of its own, waiting up to ``wait_timeout`` for either
        (then `LoadTimeout`). The wait races the limiter against a lent slot: an `asyncio.wait`
        with a timeout rather than `anyio.fail_after` around one acquisition.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.wait_timeout
        while True:
            for lender in self._lenders.get(rkey, ()):
                if lender.held:
                    return lender
            slot = _Slot(limiter)
            try:
                limiter.acquire_on_behalf_of_nowait(slot)
                slot.held = True
                return slot
            except anyio.WouldBlock:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            lent: asyncio.Future[_Slot] = loop.create_future()
            self._waiting[rkey] = lent
            acquiring = loop.create_task(limiter.acquire_on_behalf_of(slot))
            waited = False
            try:
                either: set[asyncio.Future[Any]] = {lent, acquiring}
                await asyncio.wait(either, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                waited = True
            finally:
                if self._waiting.get(rkey) is lent:
                    del self._waiting[rkey]
                lent.cancel()  # (a no-op once lent)
                if not acquiring.done():  # cancelled, it has taken nothing: anyio passes a
                    acquiring.cancel()  # token granted meanwhile on to the next waiter
                    await asyncio.wait({acquiring})
                took = not acquiring.cancelled() and acquiring.exception() is None
                # The token is kept only if no slot was lent meanwhile and nothing went wrong.
                if took and (not waited or not lent.cancelled()):
                    limiter.release_on_behalf_of(slot)
                    took = False
            if not lent.cancelled() and lent.result().held:
                return lent.result()
            if took:
                slot.held = True
                return slot
            # Nothing yet (or a slot lent and given back before this load could use it).
        self.counters.bulkhead_timeouts += 1
        raise LoadTimeout(
            f"no loader slot came free within wait_timeout={policy.wait_timeout}s: "
            f"max_concurrent_loads={int(limiter.total_tokens)} loads were running"
        )

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
