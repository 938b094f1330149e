"""
The bulkhead (``Cache(max_concurrent_loads=N)``, aiocacheguard.loading) with loads a loader
causes itself: they run under its slot, never wait for the bulkhead, and the slot is taken until
the last of them ends, so at most N top-level loads (each with its nested loads) run at once.
"""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy

from .helpers import wait_until


def bulkhead(client: redis.Redis, namespace: str, slots: int, wait_timeout: float) -> Cache:
    policy = Policy(ttl=30.0, wait_timeout=wait_timeout)
    return Cache(client, namespace=namespace, policy=policy, max_concurrent_loads=slots)


async def test_at_most_n_top_level_loads_run_each_with_its_nested_loads(
    client: redis.Redis, namespace: str
) -> None:
    async with bulkhead(client, namespace, slots=2, wait_timeout=10.0) as cache:
        release = asyncio.Event()
        parents = parents_peak = nested = nested_peak = 0

        async def child(p: int, c: int) -> int:
            nonlocal nested, nested_peak
            nested += 1
            nested_peak = max(nested_peak, nested)
            try:
                await release.wait()
            finally:
                nested -= 1
            return 100 * p + c

        async def parent(p: int) -> list[int]:
            nonlocal parents, parents_peak
            parents += 1
            parents_peak = max(parents_peak, parents)
            try:  # 8 cached lookups at once, as a loader gathering its rows would
                return list(
                    await asyncio.gather(
                        *(cache.get_or_load(f"c{p}:{c}", partial(child, p, c)) for c in range(8))
                    )
                )
            finally:
                parents -= 1

        callers = [
            asyncio.create_task(cache.get_or_load(f"p{p}", partial(parent, p))) for p in range(4)
        ]
        # Two parents hold the two slots with their 16 nested loads; the other two wait.
        await wait_until(lambda: nested == 16 and cache.statistics().loads_waiting == 2)
        stats = cache.statistics()
        assert (parents, stats.loads_running) == (2, 2)
        release.set()
        results = await asyncio.gather(*callers)
        assert results == [[100 * p + c for c in range(8)] for p in range(4)]
        assert (parents_peak, nested_peak) == (2, 16)
        stats = cache.statistics()
        assert stats.loader_calls == 4 + 32 and stats.bulkhead_timeouts == 0
        assert (stats.loads_running, stats.loads_waiting) == (0, 0)


async def test_nested_loads_at_any_depth_never_wait_for_the_slot_their_parent_holds(
    client: redis.Redis, namespace: str
) -> None:
    async with bulkhead(client, namespace, slots=1, wait_timeout=5.0) as cache:

        async def leaf(key: str) -> str:
            return key

        async def middle(key: str) -> list[str]:
            keys = [f"{key}.{i}" for i in range(2)]
            return list(
                await asyncio.gather(*(cache.get_or_load(k, partial(leaf, k)) for k in keys))
            )

        async def top() -> list[list[str]]:
            keys = [f"m{i}" for i in range(8)]
            return list(
                await asyncio.gather(*(cache.get_or_load(k, partial(middle, k)) for k in keys))
            )

        async with asyncio.timeout(2.0):  # (a wait for the slot would last wait_timeout)
            got = await cache.get_or_load("top", top)
        assert got == [[f"m{i}.0", f"m{i}.1"] for i in range(8)]
        stats = cache.statistics()
        assert stats.loader_calls == 1 + 8 + 16 and stats.bulkhead_timeouts == 0


async def test_the_slot_is_kept_while_a_load_its_loader_caused_runs_on(
    client: redis.Redis, namespace: str
) -> None:
    """The in-loader flag was copied into the nested flight's task, which then ran without a
    slot once its parent had given the slot back: two loads at once with one slot."""
    async with bulkhead(client, namespace, slots=1, wait_timeout=10.0) as cache:
        release = asyncio.Event()
        running = peak = 0
        background: list[asyncio.Task[int]] = []

        async def tracked(value: int, gate: asyncio.Event | None = None) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                if gate is not None:
                    await gate.wait()
            finally:
                running -= 1
            return value

        async def parent() -> int:
            # A load started from the loader that outlives it (a prefetch in the background).
            background.append(
                asyncio.create_task(cache.get_or_load("x", partial(tracked, 2, release)))
            )
            return await tracked(1)

        assert await cache.get_or_load("p", parent) == 1
        await wait_until(lambda: running == 1)  # x runs under p's slot, after p returned
        later = asyncio.create_task(cache.get_or_load("q", partial(tracked, 3)))
        await wait_until(lambda: cache.statistics().loads_waiting == 1)
        assert cache.statistics().loads_running == 1
        release.set()
        assert list(await asyncio.gather(background[0], later)) == [2, 3]
        assert peak == 1 and cache.statistics().loader_calls == 3


async def test_a_nested_caller_lends_its_slot_to_a_flight_waiting_for_one(
    client: redis.Redis, namespace: str
) -> None:
    """A loader asking for a key whose flight (started outside any loader) waits for the slot
    the loader holds used to wait out wait_timeout, and fail both with LoadTimeout."""
    async with bulkhead(client, namespace, slots=1, wait_timeout=3.0) as cache:
        go = asyncio.Event()
        x_calls = 0

        async def load_x() -> str:
            nonlocal x_calls
            x_calls += 1
            return "x"

        async def parent() -> str:
            await go.wait()
            return "p+" + await cache.get_or_load("x", load_x)

        holder = asyncio.create_task(cache.get_or_load("p", parent))
        await wait_until(lambda: cache.statistics().loads_running == 1)
        outsider = asyncio.create_task(cache.get_or_load("x", load_x))  # waits for the slot
        await wait_until(lambda: cache.statistics().loads_waiting == 1)
        go.set()
        async with asyncio.timeout(1.5):  # well within wait_timeout
            assert list(await asyncio.gather(holder, outsider)) == ["p+x", "x"]
        stats = cache.statistics()
        assert x_calls == 1 and stats.bulkhead_timeouts == 0
        assert (stats.loads_running, stats.loads_waiting) == (0, 0)


@pytest.mark.parametrize("cancel_at", ["waiting", "lent"])
async def test_a_cancelled_wait_for_a_slot_takes_none(
    client: redis.Redis, namespace: str, cancel_at: str
) -> None:
    async with bulkhead(client, namespace, slots=1, wait_timeout=10.0) as cache:
        release = asyncio.Event()

        async def hold() -> int:
            await release.wait()
            return 1

        holder = asyncio.create_task(cache.get_or_load("h", hold))
        await wait_until(lambda: cache.statistics().loads_running == 1)
        waiter = asyncio.create_task(cache.get_or_load("w", hold))
        await wait_until(lambda: cache.statistics().loads_waiting == 1)
        if cancel_at == "lent":
            release.set()  # the slot is granted to the waiter as it is cancelled
            await asyncio.sleep(0)
        waiter.cancel()
        release.set()
        assert await holder == 1
        await asyncio.gather(waiter, return_exceptions=True)
        await wait_until(lambda: cache.statistics().loads_running == 0)
        assert cache.statistics().loads_waiting == 0
        assert await cache.get_or_load("after", hold) == 1  # the slot is free again
