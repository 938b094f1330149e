"""
Single-flight on a real redis-server: loader call counts, every caller's result, cancellation.

Loaders are gated on asyncio.Events. A flight's loader only runs after the flight's Redis read,
and the flight task is scheduled behind every caller created before it, so by the time a gated
loader reports ``started`` all callers have joined the flight.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, CacheClosedError, Policy
from aiocacheguard.guards.singleflight import SingleFlight

from .helpers import GatedLoader, command_calls, library_tasks, wait_until

N = 1000


def spawn(
    cache: Cache, loader: GatedLoader, key: str = "k", n: int = N
) -> list[asyncio.Task[object]]:
    return [asyncio.create_task(cache.get_or_load(key, loader)) for _ in range(n)]


async def test_concurrent_misses_call_the_loader_once(cache: Cache, client: redis.Redis) -> None:
    loader = GatedLoader({"board": [1, 2, 3]})
    warm = GatedLoader()
    warm.release.set()
    await cache.get_or_load("warm-up", warm)  # the server learns the scripts (NOSCRIPT once)
    reads_before = await command_calls(client, "get", "getrange", "mget")
    scripts_before = await command_calls(client, "evalsha")
    tasks = spawn(cache, loader)
    await loader.started.wait()
    assert cache.statistics().coalesced == N - 1
    loader.release.set()
    results = await asyncio.gather(*tasks)
    assert loader.calls == 1
    assert all(r == {"board": [1, 2, 3]} for r in results)
    assert all(r is results[0] for r in results)  # one object, shared
    # One read by the flight (a GETRANGE under max_value_bytes), then two scripts (take the
    # lock; fenced fill). The fill reads the lock inside Redis, and INFO commandstats counts
    # that GET too; the acquisition asks the value's length first (STRLEN) and finds none.
    assert await command_calls(client, "evalsha") - scripts_before == 2
    assert await command_calls(client, "get", "getrange", "mget") - reads_before == 1 + 1
    stats = cache.statistics()
    assert (stats.misses, stats.loader_calls, stats.hits) == (2, 2, 0)  # with the warm-up
    assert await cache.get("k") == {"board": [1, 2, 3]}


async def test_concurrent_hits_send_one_read(cache: Cache, client: redis.Redis) -> None:
    await cache.set("k", [1, 2])
    loader = GatedLoader()
    reads_before = await command_calls(client, "get", "getrange", "mget")
    results = await asyncio.gather(*spawn(cache, loader))
    assert loader.calls == 0
    assert results == [[1, 2]] * N
    assert await command_calls(client, "get", "getrange", "mget") - reads_before == 1
    assert cache.statistics().hits == 1


async def test_concurrent_gets_send_one_read(cache: Cache, client: redis.Redis) -> None:
    await cache.set("k", "v")
    reads_before = await command_calls(client, "get", "getrange", "mget")
    results = await asyncio.gather(*(cache.get("k") for _ in range(N)))
    assert results == ["v"] * N
    assert await command_calls(client, "get", "getrange", "mget") - reads_before == 1


async def test_failing_loader_reaches_every_caller_and_caches_nothing(
    cache: Cache, client: redis.Redis
) -> None:
    error = LookupError("database said no")
    loader = GatedLoader(error=error)
    tasks = spawn(cache, loader)
    await loader.started.wait()
    loader.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert loader.calls == 1
    assert all(r is error for r in results)
    assert await client.exists(cache.keys.value("k")) == 0
    assert cache.statistics().loader_errors == 1

    # A later call loads again, and succeeds.
    again = GatedLoader("second")
    again.release.set()
    assert await cache.get_or_load("k", again) == "second"
    assert again.calls == 1


@pytest.mark.parametrize("victim", [0, 1, N // 2, N - 1])
async def test_cancelling_one_caller_leaves_the_rest_served(cache: Cache, victim: int) -> None:
    loader = GatedLoader("v")
    tasks = spawn(cache, loader)
    await loader.started.wait()
    tasks[victim].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[victim]
    assert not loader.cancelled.is_set()
    loader.release.set()
    rest = [t for i, t in enumerate(tasks) if i != victim]
    assert await asyncio.gather(*rest) == ["v"] * (N - 1)
    assert loader.calls == 1


async def test_cancelling_every_caller_cancels_the_loader(
    cache: Cache, client: redis.Redis
) -> None:
    loader = GatedLoader("v")
    tasks = spawn(cache, loader, n=50)
    await loader.started.wait()
    flights = library_tasks()
    assert flights
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    await asyncio.wait_for(loader.cancelled.wait(), 5)
    done, pending = await asyncio.wait(flights, timeout=5)
    assert not pending and all(t.cancelled() for t in done)
    # The rebuild lock the cancelled flight held is released (in the background), and then
    # no task of the Cache is left.
    await wait_until(lambda: not library_tasks())
    assert not await client.exists(cache.keys.lock(cache.keys.value("k")))
    # The key is free: the next call starts a fresh flight and loads.
    fresh = GatedLoader("fresh")
    fresh.release.set()
    assert await cache.get_or_load("k", fresh) == "fresh"


async def test_timeout_of_the_first_caller_does_not_cancel_the_load(cache: Cache) -> None:
    loader = GatedLoader("v")
    impatient = asyncio.create_task(asyncio.wait_for(cache.get_or_load("k", loader), 0.01))
    patient = asyncio.create_task(cache.get_or_load("k", loader))
    with pytest.raises(TimeoutError):
        await impatient
    loader.release.set()
    assert await patient == "v"
    assert loader.calls == 1 and not loader.cancelled.is_set()


async def test_aclose_with_callers_waiting(client: redis.Redis, namespace: str) -> None:
    cache = Cache(client, namespace=namespace, policy=Policy(ttl=30.0))
    loader = GatedLoader("v")
    tasks = spawn(cache, loader, n=10)
    await loader.started.wait()
    await cache.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    from aiocacheguard import CacheClosedError

    assert all(isinstance(r, CacheClosedError) for r in results)
    assert loader.cancelled.is_set()
    assert not library_tasks()
    with pytest.raises(CacheClosedError, match="aclose"):
        await cache.get("k")


async def test_distinct_keys_with_a_default_client(client: redis.Redis, namespace: str) -> None:
    """10,000 concurrent calls on 10,000 keys through a default redis.asyncio.Redis() pool."""
    # The test is about the pool (no MaxConnectionsError), not time: a generous budget, since
    # 10,000 flights on two busy cores can hold the event loop past the default 1 s.
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=10) as c:
        await _distinct_keys(c)


async def _distinct_keys(cache: Cache) -> None:
    calls = 0

    async def load(i: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return i

    n = 10_000
    results = await asyncio.gather(
        *(cache.get_or_load(f"k{i}", functools.partial(load, i)) for i in range(n)),
        return_exceptions=True,
    )
    assert results == list(range(n))  # no MaxConnectionsError, no other failure
    assert calls == n
    assert cache.statistics().redis_errors == 0
    values = await asyncio.gather(*(cache.get(f"k{i}") for i in range(n)))
    # Every value is cached, except fills refused because the loop, starved by 10,000 flights
    # on a busy 2-CPU machine, held a lock past its lease (counted, never silent).
    missing = [i for i, value in enumerate(values) if value != i]
    stats = cache.statistics()
    assert all(values[i] is None for i in missing)
    assert len(missing) <= stats.lock_lost + stats.unwritten_loads, (missing[:5], stats)


async def test_forget_starts_a_new_flight_for_later_callers() -> None:
    flights: SingleFlight[str, int] = SingleFlight(name="unit")
    gate = asyncio.Event()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        mine = runs
        await gate.wait()
        return mine

    first = asyncio.create_task(flights.run("k", work))
    await asyncio.sleep(0)
    flights.forget("k")
    second = asyncio.create_task(flights.run("k", work))
    await asyncio.sleep(0)
    gate.set()
    assert (await first, await second) == (1, 2)
    await flights.aclose()


async def test_the_last_caller_of_a_detached_flight_cancels_it() -> None:
    # Leaving is exact: it finds the flight its caller joined, not whatever flight the key has.
    flights: SingleFlight[str, int] = SingleFlight(name="unit")
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    first = asyncio.create_task(flights.run("k", work))
    await asyncio.sleep(0)
    flights.forget("k")
    second = asyncio.create_task(flights.run("k", work))  # a new flight
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    assert not second.done() and "k" in flights
    await flights.aclose()
    with pytest.raises(CacheClosedError):
        await second


async def test_callers_of_a_flight_are_woken_in_the_order_they_came() -> None:
    # First come, first served: with 1,000 callers the last one woken is the p99, and a caller
    # that has waited longest should not also be woken last by accident of hashing.
    flights: SingleFlight[str, int] = SingleFlight(name="unit")
    gate = asyncio.Event()
    served: list[int] = []

    async def work() -> int:
        await gate.wait()
        return 1

    async def caller(n: int) -> None:
        await flights.run("k", work)
        served.append(n)

    callers = [asyncio.create_task(caller(n)) for n in range(N)]
    await wait_until(
        lambda: (flight := flights.flight("k")) is not None and len(flight.waiters) == N
    )
    gate.set()
    await asyncio.gather(*callers)
    assert served == list(range(N))
    await flights.aclose()
