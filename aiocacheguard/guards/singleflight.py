"""
In-process single-flight: concurrent calls for one key share one task.

The shared task is created and owned by the `SingleFlight` (and so by the Cache), never by the
first caller. Callers wait on it through `asyncio.shield`, and a waiter count lets the last
caller out cancel the work when nobody wants it any more (the async-lru design). cashews'
``thunder_protection``, by contrast, cancels every waiter's load when the first caller is
cancelled.

Guarantees:
    - While a flight for a key runs, every `SingleFlight.run` for that key joins it: the work
      runs once, and its result or exception reaches every caller that joined.
    - Cancelling a caller, the first included, cancels only that caller while others wait.
    - When the last waiting caller is cancelled the work is cancelled too, and the key is free
      at once for a new flight.
    - No task outlives `SingleFlight.aclose`; exceptions nobody awaited are still retrieved,
      so asyncio never logs "exception was never retrieved".

Limitations:
    - In-process only: other processes are coordinated by the rebuild lock.
    - The first caller's work function is the one that runs; joiners' functions are ignored.
    - All callers receive the very same result object; treat it as immutable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from ..errors import CacheClosedError

__all__ = ("SingleFlight",)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiters = 0


class SingleFlight(Generic[K, T]):
    """
    A map of in-flight tasks, one per key.

    Example:
        >>> async def main() -> list[int]:
        ...     flights: SingleFlight[str, int] = SingleFlight(name="demo")
        ...     calls = 0
        ...     async def work() -> int:
        ...         nonlocal calls
        ...         calls += 1
        ...         await asyncio.sleep(0.01)
        ...         return 42
        ...     results = await asyncio.gather(*(flights.run("k", work) for _ in range(100)))
        ...     assert calls == 1
        ...     return sorted(set(results))
        >>> asyncio.run(main())
        [42]
    """

    __slots__ = ("_flights", "_name", "_tasks")

    def __init__(self, *, name: str) -> None:
        self._name = name
        self._flights: dict[K, _Flight[T]] = {}
        self._tasks: set[asyncio.Task[T]] = set()  # detached flights included

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """
        Join the flight for ``key``, starting it with ``work()`` if there is none.

        Raises:
            Whatever ``work`` raised; `CacheClosedError` if `aclose` cancelled the flight while
            this caller waited.
        """
        flight = self._flights.get(key)
        if flight is None:
            task = asyncio.create_task(work(), name=f"aiocacheguard-{self._name}")
            flight = _Flight(task)
            self._flights[key] = flight
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._finished(key, flight))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # This caller was cancelled. The last one out takes the work down with it.
                if flight.waiters == 1 and not flight.task.done():
                    flight.task.cancel()
                    self._forget(key, flight)
                raise
            # The shared task was cancelled under us, not this caller.
            raise CacheClosedError("the cache was closed while this call waited") from None
        finally:
            flight.waiters -= 1

    def forget(self, key: K) -> None:
        """
        Detach the current flight of ``key``: it keeps running for the callers already waiting,
        but later callers start a new one (used after a write, so they read what was written).
        """
        flight = self._flights.get(key)
        if flight is not None:
            self._forget(key, flight)

    def _forget(self, key: K, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _finished(self, key: K, flight: _Flight[T]) -> None:
        self._forget(key, flight)
        self._tasks.discard(flight.task)
        if not flight.task.cancelled():
            flight.task.exception()  # mark retrieved: the waiters, if any, re-raise it

    async def aclose(self) -> None:
        """Cancel every flight and wait until all have finished."""
        tasks = list(self._tasks)
        self._flights.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
