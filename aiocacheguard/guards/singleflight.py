"""
In-process single-flight: concurrent calls for one key share one task.

The shared task is created and owned by the `SingleFlight` (and so by the Cache), never by the
first caller. Each caller waits on a future of its own that the task resolves (the effect of
async-lru's `asyncio.shield` per caller, at half the scheduling cost). The waiting futures,
kept in arrival order (the order they are woken in), let the last caller out cancel the work
when nobody wants it any more. cashews' ``thunder_protection``, by contrast, cancels every
waiter's load when the first caller is cancelled.

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
from typing import Any, Generic, TypeVar, TypeVarTuple, cast

from ..errors import CacheClosedError

__all__ = ("Flight", "SharedCall", "SingleFlight")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class _Abandoned(Exception):
    """The caller running a shared call was cancelled; its joiners go again."""


class _Shared(Generic[T]):
    # One future for every joiner (waking them costs one callback each). Cancelling a joiner
    # cancels it for all: the others notice they were not cancelled themselves and join again
    # (a new future), so only a cancellation pays for it.
    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[T] | None = None  # made when a second caller joins

    def join(self) -> asyncio.Future[T]:
        future = self.future
        if future is None or future.done():
            future = self.future = asyncio.get_running_loop().create_future()
        return future

    def settle(self, result: T | None, error: BaseException | None) -> None:
        future = self.future
        if future is None or future.done():
            return
        if error is None:
            future.set_result(cast(T, result))
            return
        future.set_exception(error if isinstance(error, Exception) else _Abandoned())
        future.exception()  # retrieved, even if every joiner has gone


class SharedCall(Generic[K, T]):
    """
    Concurrent calls for one key share the first caller's call, which runs in that caller's
    own task: no task is created, so a call with nobody to share it with costs one dict
    lookup. For idempotent work only (a read): if the first caller is cancelled, its joiners
    are not, and one of them makes the call again.

    Example:
        >>> async def main() -> tuple[int, list[int]]:
        ...     reads: SharedCall[str, int] = SharedCall()
        ...     calls = 0
        ...     async def read() -> int:
        ...         nonlocal calls
        ...         calls += 1
        ...         await asyncio.sleep(0.01)
        ...         return 42
        ...     results = await asyncio.gather(*(reads.run("k", read) for _ in range(100)))
        ...     return calls, sorted(set(results))
        >>> asyncio.run(main())
        (1, [42])
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[K, _Shared[T]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._calls

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The result of ``work()``, or of the same key's call already running."""
        calls = self._calls
        while (shared := calls.get(key)) is not None:
            try:
                return await shared.join()
            except _Abandoned:
                continue
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this joiner was cancelled
                continue  # another joiner's cancellation cancelled the shared future
        shared = calls[key] = _Shared()
        result: T | None = None
        error: BaseException | None = None
        try:
            result = await work()
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.end(key, shared, result, error)

    def lead(self, key: K) -> _Shared[T] | None:
        """
        `run` without its coroutine, for a hot path: start the key's call in the caller's own
        code, or None when one is running (then `run` joins it). The caller makes the call and
        must `end` it with its outcome, whatever happens (``try``/``finally``).
        """
        calls = self._calls
        if key in calls:
            return None
        shared = calls[key] = _Shared()
        return shared

    def end(
        self, key: K, shared: _Shared[T], result: T | None, error: BaseException | None
    ) -> None:
        """The call `lead` started ended: its joiners get ``result``, or ``error``."""
        if self._calls.get(key) is shared:
            del self._calls[key]
        shared.settle(result, error)

    def forget(self, key: K) -> None:
        """Later callers make their own call (the one running may predate a write)."""
        self._calls.pop(key, None)

    def forget_all(self) -> None:
        """`forget` every key."""
        self._calls.clear()


class Flight(Generic[K, T]):
    """
    One key's flight, as `SingleFlight.join` hands it out: the task doing the work, and one
    future per caller waiting for its outcome. Cancelling a caller cancels only its own future;
    the task delivers its outcome to every future still waiting. Cheaper than one
    asyncio.shield per caller, which costs a second callback hop per waiter.
    """

    __slots__ = ("_flights", "key", "task", "waiters")

    def __init__(self, key: K, task: asyncio.Task[T], flights: dict[K, Flight[K, T]]) -> None:
        self.key = key
        self.task = task
        # Insertion-ordered, so the callers are woken in the order they came.
        self.waiters: dict[asyncio.Future[T], None] = {}
        self._flights = flights  # the owner's map, which the last caller out removes it from

    def waiter(self) -> asyncio.Future[T]:
        """A future of the flight's outcome, for one caller to await, and to `leave` if it stops."""
        waiter: asyncio.Future[T] = self.task.get_loop().create_future()
        self.waiters[waiter] = None
        return waiter

    def leave(self, waiter: asyncio.Future[T]) -> None:
        """
        The caller of ``waiter`` stops waiting (it was cancelled; once the outcome is out,
        this changes nothing). If nobody waits any more, the work is cancelled and the key is
        free at once for a new flight.
        """
        self.waiters.pop(waiter, None)
        if not self.waiters and not self.task.done():
            self.task.cancel()
            self.detach()

    def detach(self) -> None:
        """Later callers of the key start a new flight; this one runs on for its waiters."""
        if self._flights.get(self.key) is self:
            del self._flights[self.key]


class SingleFlight(Generic[K, T]):
    """
    A map of in-flight tasks, one per key.

    `run` is the whole protocol in one call. A caller that cannot afford a coroutine of its
    own per wait (thousands of callers of one key each hold theirs until the outcome lands)
    takes the steps of `run` itself: `join`, await `Flight.waiter`, and `Flight.leave` if that
    await raises.

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

    __slots__ = ("_closed", "_flights", "_name", "_tasks")

    def __init__(self, *, name: str) -> None:
        self._name = name
        self._flights: dict[K, Flight[K, T]] = {}
        self._tasks: set[asyncio.Task[T]] = set()  # detached flights included
        self._closed = False

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: object) -> bool:
        return key in self._flights

    def flight(self, key: K) -> Flight[K, T] | None:
        """The running flight of ``key`` to wait on (`Flight.waiter`), or None."""
        return self._flights.get(key)

    async def run(self, key: K, work: Callable[[*Ts], Coroutine[Any, Any, T]], *args: *Ts) -> T:
        """
        Join the flight for ``key``, starting it with ``work(*args)`` if there is none.

        Raises:
            Whatever ``work`` raised; `CacheClosedError` if `aclose` cancelled the flight while
            this caller waited.
        """
        flight = self.join(key, work, *args)
        waiter = flight.waiter()
        try:
            return await waiter
        except BaseException:
            flight.leave(waiter)
            raise

    def join(
        self, key: K, work: Callable[[*Ts], Coroutine[Any, Any, T]], *args: *Ts
    ) -> Flight[K, T]:
        """
        The flight for ``key``, started with ``work(*args)`` if there is none; never awaits.

        Raises:
            CacheClosedError: `aclose` was called, and there is no flight to join.
        """
        flight = self._flights.get(key)
        if flight is None:
            if self._closed:  # a caller whose read was on its way when aclose() ran
                raise CacheClosedError("the cache was closed while this call waited")
            task = asyncio.create_task(work(*args), name=f"aiocacheguard-{self._name}")
            flight = self._flights[key] = Flight(key, task, self._flights)
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._finished(flight))
        return flight

    def forget(self, key: K) -> None:
        """
        Detach the current flight of ``key``: it keeps running for the callers already waiting,
        but later callers start a new one (used after a write, so they read what was written).
        """
        flight = self._flights.get(key)
        if flight is not None:
            flight.detach()

    def _finished(self, flight: Flight[K, T]) -> None:
        flight.detach()
        task = flight.task
        self._tasks.discard(task)
        if task.cancelled():
            error: BaseException | None = CacheClosedError(
                "the cache was closed while this call waited"
            )
            result = None
        else:
            error = task.exception()  # also marks it retrieved
            result = None if error is not None else task.result()
        for waiter in flight.waiters:
            if waiter.done():
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(cast(T, result))

    async def aclose(self) -> None:
        """Cancel every flight and wait until all have finished."""
        self._closed = True
        tasks = list(self._tasks)
        self._flights.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
