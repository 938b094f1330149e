"""
A forced refresh (`Cache.refresh`, ``@cached``'s ``.refresh()``) that could not write its
value raises, as `Cache.set` does, instead of returning a value that later reads do not see
(they would keep the old one for the rest of its TTL). Could not write: Redis refused the
connection or swallowed every byte (at the acquisition, or at the fill after the loader ran),
another process's refresh held the rebuild lock past ``wait_timeout`` without filling, or the
value is past ``max_value_bytes``. Each time Redis keeps the old value, and nothing is left.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Cache,
    LockTimeout,
    Policy,
    ValueTooLargeError,
    cached,
)
from aiocacheguard.testing import FaultProxy

from ..helpers import GatedLoader
from .checks import locks_left, through

BUDGET = 0.2
POLICY = Policy(ttl=30.0, lock_ttl=1.0)


def switch_on(proxy: FaultProxy, fault: str) -> type[BackendError]:
    """Start the fault; the error a command then fails with."""
    if fault == "blackhole":
        proxy.blackhole()
        return BackendTimeout
    proxy.refuse()
    return BackendUnavailable


@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
async def test_a_forced_refresh_that_cannot_reach_redis_raises(
    client: redis.Redis, proxy: FaultProxy, namespace: str, fault: str
) -> None:
    faulty = through(proxy.port, f"{namespace}-refresh")
    async with Cache(
        faulty, namespace=namespace, policy=POLICY, command_timeout=BUDGET, breaker=None
    ) as cache:  # (no breaker: each call meets the fault itself, and the heal is at once)
        versions = {"user": 1}

        @cached(cache, key="user:{user_id}")
        async def user(user_id: int) -> dict[str, int]:
            return {"id": user_id, "version": versions["user"]}

        await cache.set("k", "old")
        assert await user(1) == {"id": 1, "version": 1}
        versions["user"] = 2
        loader = GatedLoader("new")
        loader.release.set()
        error = switch_on(proxy, fault)
        started = time.monotonic()
        with pytest.raises(error):
            await cache.refresh("k", loader)
        with pytest.raises(error):
            await user.refresh(1)
        assert time.monotonic() - started < 2 * (BUDGET + 0.5)  # one budget each, and slack
        assert loader.calls == 0  # nothing to write it with: not loaded either
        await proxy.heal()
        # Redis still holds the old values, and said so to the refresh: it raised.
        assert await cache.get("k") == "old"
        assert await user(1) == {"id": 1, "version": 1}
        assert await user.refresh(1) == {"id": 1, "version": 2}  # healed: written
        assert await user(1) == {"id": 1, "version": 2}
    await faulty.aclose()
    assert await locks_left(client, namespace) == []  # (never taken: nothing reached Redis)


@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
async def test_a_forced_refresh_whose_fill_fails_raises(
    client: redis.Redis, proxy: FaultProxy, namespace: str, fault: str
) -> None:
    faulty = through(proxy.port, f"{namespace}-refresh")
    async with Cache(
        faulty, namespace=namespace, policy=POLICY, command_timeout=BUDGET, breaker=None
    ) as cache:  # (no breaker: each call meets the fault itself, and the heal is at once)
        await cache.set("k", "old")
        loader = GatedLoader("new")
        refreshing = asyncio.create_task(cache.refresh("k", loader))
        await loader.started.wait()  # the lock is taken: the fill is all that is left
        error = switch_on(proxy, fault)
        loader.release.set()
        with pytest.raises(error):
            await refreshing
        assert loader.calls == 1
        await proxy.heal()
        assert await cache.get("k") == "old"
        # The lock is released (in the background) or lapses with its lease (1 s).
        deadline = time.monotonic() + POLICY.lock_ttl + 3.0
        while await locks_left(client, namespace) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling Redis's state, not synchronising tasks
        assert await locks_left(client, namespace) == []
        assert await cache.refresh("k", loader) == "new"  # healed: written
        assert await cache.get("k") == "new"
    await faulty.aclose()


async def test_a_forced_refresh_that_waits_out_another_holder_raises(
    client: redis.Redis, namespace: str
) -> None:
    policy = Policy(ttl=30.0, wait_timeout=0.2, lock_ttl=10.0)
    async with Cache(client, namespace=namespace, policy=policy) as cache:
        await cache.set("k", "old")
        rkey = cache.keys.value("k")
        # Another process's refresh holds the lock, and will not fill within wait_timeout.
        await client.set(cache.keys.lock(rkey), "another-process", px=10_000)
        loader = GatedLoader("new")
        loader.release.set()
        with pytest.raises(LockTimeout, match="nothing was written"):
            await cache.refresh("k", loader)
        assert loader.calls == 0
        assert await cache.get("k") == "old"
        await client.delete(cache.keys.lock(rkey))


async def test_a_forced_refresh_too_large_to_cache_raises(
    client: redis.Redis, namespace: str
) -> None:
    async with Cache(client, namespace=namespace, policy=POLICY, max_value_bytes=10_000) as cache:
        await cache.set("k", "old")
        loader = GatedLoader("x" * 20_000)
        loader.release.set()
        with pytest.raises(ValueTooLargeError):  # as set() of that value raises
            await cache.refresh("k", loader)
        assert loader.calls == 1
        assert await cache.get("k") == "old"
        assert await locks_left(client, namespace) == []  # released at once
        assert cache.statistics().values_too_large == 1
