"""
Family (c): Redis answers, but refuses writes: full under ``maxmemory`` with ``noeviction``
(OOM), or a replica (READONLY). Reads still work, so the breaker must not open and hits are
still served; misses are served by the loader, once per key per process, and not cached.

Asserted, for 200 concurrent callers over 4 keys in each of two processes:
    - every caller gets its key's value within 5 s (bound; measured well under 0.5 s);
    - loads per key: at most one per process (2 in all), since the lock cannot be written;
    - keys Redis still holds are served from it (READONLY: replicated values are hits);
    - refused writes are counted (``writes_refused``) and said once (one WARNING line for
      the whole episode, not one per write), and the breaker stays closed;
    - once Redis accepts writes again (``maxmemory 0``; ``REPLICAOF NO ONE``), the next miss
      fills, and Redis holds the newest value; no lock, subscription or task is left.

`tests/test_breaker.py::test_a_full_redis_still_serves_loads_and_says_so_once` covers the
sequential OOM case; this family adds the stampede, READONLY and recovery.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisServer

from .checks import assert_nothing_left

KEYS = [f"k{i}" for i in range(4)]


async def load(calls: dict[str, int], key: str, version: str) -> str:
    calls[key] = calls.get(key, 0) + 1
    await asyncio.sleep(0.02)  # long enough for the stampede to pile up on the flight
    return f"{key} {version}"


async def stampede(caches: list[Cache], calls: dict[str, int], version: str) -> None:
    async def one(cache: Cache, key: str) -> str:
        return await cache.get_or_load(key, functools.partial(load, calls, key, version))

    tasks = [one(cache, key) for cache in caches for key in KEYS for _ in range(50)]
    async with asyncio.timeout(5):
        got = await asyncio.gather(*tasks)
    assert got == [f"{key} {version}" for _ in caches for key in KEYS for _ in range(50)]


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.fixture
async def own_server() -> AsyncIterator[redis.Redis]:
    with RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]) as server:
        async with redis.Redis(port=server.port) as client:
            yield client


async def test_a_full_redis_under_a_stampede(
    own_server: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    direct = own_server
    policy = Policy(ttl=30.0)
    async with (
        Cache(direct, namespace=namespace, policy=policy) as a,
        Cache(direct, namespace=namespace, policy=policy) as b,
    ):
        await a.set("hit", "cached before")
        await direct.config_set("maxmemory-policy", "noeviction")
        await direct.config_set("maxmemory", 1)  # every write is now refused: OOM
        calls: dict[str, int] = {}
        await stampede([a, b], calls, "v1")
        assert all(1 <= calls[key] <= 2 for key in KEYS), calls
        assert await a.get("hit") == "cached before"  # reads still work
        for cache in (a, b):
            stats = cache.statistics()
            assert stats.writes_refused >= 1 and stats.breaker_opened == 0
        assert warnings(caplog, "Redis refuses writes") == 2  # one per Cache, not per write
        # Redis accepts writes again: the next miss fills, and the newest value is stored.
        await direct.config_set("maxmemory", 0)
        await stampede([a, b], calls, "v2")
        assert [await a.get(key) for key in KEYS] == [f"{key} v2" for key in KEYS]
    await assert_nothing_left(direct, namespace)


async def test_a_replica_refuses_writes_under_a_stampede(
    own_server: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    primary = own_server
    port = primary.connection_pool.connection_kwargs["port"]
    with RedisServer() as replica_server:
        replica = redis.Redis(port=replica_server.port)
        policy = Policy(ttl=60.0)
        async with Cache(primary, namespace=namespace, policy=policy) as writer:
            await writer.set("hit", "replicated")
        await replica.replicaof("127.0.0.1", port)
        async with asyncio.timeout(10):
            while (await replica.info("replication")).get("master_link_status") != "up":
                await asyncio.sleep(0.02)
        await primary.execute_command("WAIT", 1, 2000)  # type: ignore[no-untyped-call]
        async with (
            Cache(replica, namespace=namespace, policy=policy) as a,
            Cache(replica, namespace=namespace, policy=policy) as b,
        ):
            calls: dict[str, int] = {}

            async def never() -> str:
                raise AssertionError("a replicated value is a hit")

            assert await a.get_or_load("hit", never) == "replicated"
            await stampede([a, b], calls, "v1")
            assert all(1 <= calls[key] <= 2 for key in KEYS), calls
            assert a.statistics().writes_refused >= 1 and a.statistics().breaker_opened == 0
            assert warnings(caplog, "Redis refuses writes (ReadOnlyError") == 2
            # Promoted (as after a failover): it accepts writes, and fills resume.
            await replica.replicaof("NO", "ONE")
            await stampede([a, b], calls, "v2")
            assert [await a.get(key) for key in KEYS] == [f"{key} v2" for key in KEYS]
        await assert_nothing_left(replica, namespace)
        await replica.aclose()
