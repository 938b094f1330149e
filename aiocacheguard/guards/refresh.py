"""
Supervised background refresh: logical expiry and probabilistic early refresh (XFetch).

When an entry is past its soft TTL (or XFetch decides to refresh it early), the Cache serves the
value it has and asks the `Refresher` to rebuild it in the background. The Refresher owns those
tasks: at most one per key, at most ``max_concurrent`` at a time, and none outlives `aclose`.

XFetch (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache Stampede Prevention",
VLDB 2015): a read refreshes early when ``now - delta * beta * ln(rand()) >= expiry``, where
``delta`` is how long the value took to compute. The chance grows as expiry nears, and is larger
for values that are slow to compute, so one reader usually rebuilds the value just before it
expires and nobody ever waits for it.

Guarantees:
    - At most one refresh per key per process runs at a time; a second request joins it or is
      dropped (background), never queued without bound.
    - ``aclose()`` cancels the refreshes in flight, or with ``drain=True`` waits for them;
      either way no task is left behind.
    - A failing background refresh never raises into an unrelated caller: its exception is
      handed to the Cache's error handling (statistics, log, event hook).

    - A key whose refresh failed is not refreshed in the background again until a backoff
      has passed (1 s, doubling per failure up to 60 s), so a stale key whose loader keeps
      failing does not start a refresh on every read.

Limitations:
    - A refresh dropped because ``max_concurrent`` were running (or backing off) is not
      retried by itself; the next read of the stale entry asks again.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Final, Generic, TypeVar

from ..errors import CacheClosedError

__all__ = ("Refresher", "xfetch_due")

K = TypeVar("K", bound=Hashable)

#: Backoff after a key's background refresh failed: BACKOFF_FIRST seconds, doubling with each
#: further failure, at most BACKOFF_MAX. At most BACKOFF_KEYS keys are remembered.
BACKOFF_FIRST: Final = 1.0
BACKOFF_MAX: Final = 60.0
BACKOFF_KEYS: Final = 10_000


def xfetch_due(*, now: float, expiry: float, delta: float, beta: float, rng: random.Random) -> bool:
    """
    Whether a read at ``now`` should refresh a value expiring at ``expiry`` early.

    ``delta`` is the value's compute time in seconds; ``beta`` > 1 favours earlier refreshes,
    < 1 later ones, 0 never.

    Example:
        >>> rng = random.Random(7)
        >>> xfetch_due(now=0.0, expiry=100.0, delta=0.05, beta=1.0, rng=rng)  # far from expiry
        False
        >>> xfetch_due(now=100.0, expiry=100.0, delta=0.05, beta=1.0, rng=rng)  # at expiry
        True
    """
    if beta <= 0 or delta <= 0:
        return now >= expiry
    draw = 1.0 - rng.random()  # in (0, 1], so the logarithm is finite
    return now - delta * beta * math.log(draw) >= expiry


class Refresher(Generic[K]):
    """Owns the background refresh tasks of one Cache."""

    __slots__ = ("_clock", "_closed", "_detached", "_failures", "_max_concurrent", "_tasks")

    def __init__(self, *, max_concurrent: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_concurrent = max_concurrent
        self._clock = clock
        self._tasks: dict[K, asyncio.Task[Any]] = {}
        self._detached: set[asyncio.Task[Any]] = set()  # forgotten, still owned until done
        self._closed = False
        self._failures: dict[K, tuple[int, float]] = {}  # key -> (failures, retry at)

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def schedule(self, key: K, work: Callable[[], Coroutine[Any, Any, Any]]) -> bool:
        """
        Start ``work()`` in the background unless ``key`` is already refreshing or the bound is
        reached. Returns whether it started. ``work`` must handle its own errors.
        """
        if self._closed or key in self._tasks or len(self._tasks) >= self._max_concurrent:
            return False
        failed = self._failures.get(key)
        if failed is not None and self._clock() < failed[1]:
            return False
        self._start(key, work)
        return True

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """
        Join the refresh of ``key`` in progress, or start one (ignoring the bound); await it.

        Raises:
            CacheClosedError: `aclose` ran before or during the call.
        """
        if self._closed:
            raise CacheClosedError("this Cache was closed with aclose(); create a new one")
        task = self._tasks.get(key) or self._start(key, work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                raise CacheClosedError("the cache was closed while this call waited") from None
            raise

    def forget(self, key: K) -> None:
        """
        Later requests for ``key`` start a refresh of their own (the one running may have read
        data older than a write); it goes on for its callers, and `aclose` still owns it.
        """
        task = self._tasks.pop(key, None)
        if task is not None and not task.done():
            self._detached.add(task)
            task.add_done_callback(self._detached.discard)

    def _start(self, key: K, work: Callable[[], Coroutine[Any, Any, Any]]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work(), name="aiocacheguard-refresh")
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        return task

    def _finished(self, key: K, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if task.cancelled():
            return
        if task.exception() is None:  # handled by the work itself; now marked retrieved
            self._failures.pop(key, None)
            return
        failures = self._failures.pop(key, (0, 0.0))[0] + 1
        if len(self._failures) >= BACKOFF_KEYS:  # forget the oldest
            del self._failures[next(iter(self._failures))]
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        self._failures[key] = (failures, self._clock() + backoff)

    async def aclose(self, *, drain: bool = False) -> None:
        """Cancel the refreshes in flight (default), or wait for them with ``drain=True``."""
        self._closed = True
        tasks = [*self._tasks.values(), *self._detached]
        if not drain:
            for task in tasks:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
