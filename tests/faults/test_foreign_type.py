"""
A key of another Redis type where a record belongs (a hash, a list: written by another
program into the namespace): a counted miss, never an error, repaired by the next fill, and no
business of the circuit breaker (WRONGTYPE is an answer, not Redis being unreachable).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisClusterServer, RedisServer

from ..helpers import GatedLoader

Client = redis.Redis | RedisCluster


@pytest.fixture(params=["standalone", "cluster"])
async def deployment(request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        client: Client = redis.Redis(port=server.port)
    else:
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
        await client.initialize()
    yield client
    await client.aclose()


async def plant(client: Client, cache: Cache, key: str, kind: str) -> bytes:
    """Another program's data at the key's Redis name."""
    rkey = cache.keys.value(key)
    await client.delete(rkey)
    if kind == "hash":
        await client.hset(rkey, "field", "value")
    else:
        await client.rpush(rkey, "a", "b")
    return rkey


@pytest.mark.parametrize("kind", ["hash", "list"])
async def test_get_returns_the_default_and_counts_it(
    deployment: Client, namespace: str, kind: str
) -> None:
    async with Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        await plant(deployment, cache, "k", kind)
        for _ in range(20):  # more than the breaker's run of failures
            assert await cache.get("k", default="absent") == "absent"
        stats = cache.statistics()
        assert stats.decode_errors == 20 and stats.misses == 20
        assert stats.redis_errors == 0 and stats.breaker_opened == 0
        assert cache.breaker is not None and cache.breaker.closed


async def test_get_many_reads_around_it(deployment: Client, namespace: str) -> None:
    async with Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        await cache.set_many({f"k{i}": i for i in range(10)})
        await plant(deployment, cache, "k3", "hash")
        expected = [None if i == 3 else i for i in range(10)]
        assert await cache.get_many([f"k{i}" for i in range(10)]) == expected
        assert cache.statistics().redis_errors == 0


@pytest.mark.parametrize("kind", ["hash", "list"])
async def test_get_or_load_loads_once_under_the_lock_and_repairs_the_key(
    deployment: Client, namespace: str, kind: str
) -> None:
    async with Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        rkey = await plant(deployment, cache, "k", kind)
        loader = GatedLoader("loaded")
        # Many callers at once, with reads of other keys, so the read is batched too.
        callers = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(50)]
        others = [asyncio.create_task(cache.get(f"other{i}")) for i in range(50)]
        await loader.started.wait()
        loader.release.set()
        assert await asyncio.gather(*callers) == ["loaded"] * 50
        assert await asyncio.gather(*others) == [None] * 50
        assert loader.calls == 1
        stats = cache.statistics()
        assert stats.lock_acquired == 1  # the usual miss path: the lock, then the fill
        assert stats.decode_errors >= 1 and stats.redis_errors == 0
        assert await deployment.type(rkey) == b"string"  # the fill replaced the foreign key
        # Repaired: a hit from now on, in this Cache and in a fresh one.
        assert await cache.get_or_load("k", loader) == "loaded"
        async with Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0)) as fresh:
            assert await fresh.get("k") == "loaded"
        assert loader.calls == 1


async def test_set_overwrites_it(deployment: Client, namespace: str) -> None:
    async with Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        await plant(deployment, cache, "k", "hash")
        await cache.set("k", {"a": 1})
        assert await cache.get("k") == {"a": 1}
