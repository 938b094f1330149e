"""Cancelling callers mid-command, through a proxy that slows Redis down (redis-py cwe_404)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocacheguard import BackendTimeout, Cache, Policy
from aiocacheguard.testing import FaultProxy, RedisServer

from .helpers import library_tasks
from .proxy import DelayProxy


@pytest.fixture
async def slow_cache(redis_server: RedisServer, namespace: str) -> AsyncIterator[Cache]:
    proxy = DelayProxy(redis_server.port)
    await proxy.start()
    client = redis.Redis(port=proxy.port)
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        for i in range(20):
            await cache.set(f"k{i}", f"value {i}")
        proxy.latency = 0.05  # every read and reply now waits 50 ms each way
        yield cache
    await client.aclose()
    await proxy.stop()


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.06, 0.12])
async def test_cancel_mid_command_keeps_replies_matched(slow_cache: Cache, delay: float) -> None:
    async def never() -> str:
        raise AssertionError("every key is cached")

    victims = [asyncio.create_task(slow_cache.get_or_load(f"k{i}", never)) for i in range(10)]
    survivors = [asyncio.create_task(slow_cache.get(f"k{i}")) for i in range(10, 20)]
    await asyncio.sleep(delay)  # cancel at different points of the round trip
    for task in victims:
        task.cancel()
    await asyncio.gather(*victims, return_exceptions=True)
    assert await asyncio.gather(*survivors) == [f"value {i}" for i in range(10, 20)]
    # Every later reply still belongs to its own request.
    again = await asyncio.gather(*(slow_cache.get_or_load(f"k{i}", never) for i in range(20)))
    assert again == [f"value {i}" for i in range(20)]


async def test_cancelling_callers_at_each_await_point_of_a_miss(slow_cache: Cache) -> None:
    """A miss awaits a read, a lock script, the loader and the fill; cancel around each."""
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "loaded"

    for step, delay in enumerate([0.0, 0.03, 0.08, 0.13, 0.18, 0.23, 0.3]):
        key = f"miss{step}"
        first = asyncio.create_task(slow_cache.get_or_load(key, load))
        others = [asyncio.create_task(slow_cache.get_or_load(key, load)) for _ in range(5)]
        await asyncio.sleep(delay)
        first.cancel()
        assert await asyncio.gather(*others) == ["loaded"] * 5
        # No task of the Cache is stuck, and the value landed.
        assert await slow_cache.get(key) == "loaded"
    assert calls == 7
    assert not [t for t in library_tasks() if "load" in t.get_name()]


async def test_a_lone_read_past_its_budget_is_a_timeout_and_leaves_the_task_uncancelled(
    redis_server: RedisServer, namespace: str
) -> None:
    # The direct path's budget is a timer that cancels the caller's task: the caller sees
    # BackendTimeout, not CancelledError, and its task carries no cancellation afterwards.
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        try:
            async with Cache(
                client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=0.2,
                breaker=None,
            ) as cache:  # fmt: skip
                await cache.set("k", 1)
                proxy.blackhole()
                for _ in range(3):
                    with pytest.raises(BackendTimeout):
                        await cache.get("k")
                    task = asyncio.current_task()
                    assert task is not None and task.cancelling() == 0
                    await asyncio.sleep(0.01)  # no cancellation left pending

                # A cancellation from elsewhere during the same wait stays a cancellation.
                reading = asyncio.create_task(cache.get("k"))
                await asyncio.sleep(0.05)
                reading.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reading
                await proxy.heal()
                assert await cache.get("k") == 1
        finally:
            await client.aclose()
