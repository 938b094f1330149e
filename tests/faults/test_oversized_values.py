"""
Values past the Cache's ``max_value_bytes``: refused on write with a named error before any
I/O, served but not cached when a loader returns one, and, when found in Redis (written by a
client without the limit), refused inside Redis: every read (the lone GET, a batch, a
Cluster node's pipeline, the rebuild lock's acquisition) checks the length in the same round
trip, so the value is never transferred, never times a read out, and is no failure of the node
(the circuit breaker never hears of it); each is a counted miss, said once per episode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from aiocacheguard import (
    Cache,
    ConfigurationError,
    JsonSerializer,
    Policy,
    SerializationError,
    ValueTooLargeError,
)
from aiocacheguard.codec import DEFAULT_MAX_VALUE_BYTES
from aiocacheguard.testing import FaultProxy, RedisClusterServer, RedisServer

from ..helpers import GatedLoader, command_calls

LIMIT = 10_000
#: A value another client stored without the limit: 4,000 times it, big enough that its
#: transfer cannot hide in the bound below (the issue's was 300 MB: 450 ms a read).
HUGE = 40 * 1024 * 1024
#: What the test's reads of it may cost in bytes Redis sends: a lone read's GETRANGE answers
#: ``LIMIT + 1`` bytes of it (10 of those), a batch's script or a lock's acquisition none; then
#: the other keys' small values and INFO's own replies. Measured: 145-158 KB (before: 671 MB).
SENT_BOUND = 200_000

Client = redis.Redis | RedisCluster


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(redis_server.port) as proxy:
        yield proxy


def ready(value: object) -> GatedLoader:
    """A loader that returns at once (and counts its calls)."""
    loader = GatedLoader(value)
    loader.release.set()
    return loader


class CountingJson(JsonSerializer):
    """JSON that counts its decodes."""

    __slots__ = ("decoded",)

    def __init__(self) -> None:
        self.decoded = 0

    def loads(self, data: bytes) -> Any:
        self.decoded += 1
        return super().loads(data)


def test_the_default_is_16_mib_and_the_setting_is_checked(client: redis.Redis) -> None:
    assert DEFAULT_MAX_VALUE_BYTES == 16 * 1024 * 1024
    policy = Policy(ttl=30.0)
    for bad in (0, -1, 1.5, True, "1MB"):
        with pytest.raises(ConfigurationError, match="max_value_bytes"):
            Cache(client, namespace="n", policy=policy, max_value_bytes=bad)  # type: ignore[arg-type]
    Cache(client, namespace="n", policy=policy, max_value_bytes=None)  # no limit


async def test_set_refuses_a_value_past_the_limit_before_any_io(
    proxy: FaultProxy, client: redis.Redis, namespace: str
) -> None:
    through = redis.Redis(port=proxy.port)
    async with Cache(
        through, namespace=namespace, policy=Policy(ttl=30.0), max_value_bytes=LIMIT
    ) as cache:
        await cache.set("small", "x" * (LIMIT // 2))  # a record within the limit is written
        sent = proxy.statistics().bytes_upstream
        with pytest.raises(ValueTooLargeError) as raised:
            await cache.set("big", "x" * LIMIT)
        assert isinstance(raised.value, SerializationError)  # one except catches both
        assert raised.value.limit == LIMIT and raised.value.size > LIMIT
        assert "max_value_bytes=10,000" in str(raised.value)
        assert proxy.statistics().bytes_upstream == sent  # not one byte sent for it
        with pytest.raises(ValueTooLargeError):  # one too large: none of them is written
            await cache.set_many({"a": 1, "too-big": "y" * LIMIT, "b": 2})
        assert proxy.statistics().bytes_upstream == sent
        assert await client.exists(cache.keys.value("big"), cache.keys.value("too-big")) == 0
        assert await cache.get_many(["small", "a", "b"]) == ["x" * (LIMIT // 2), None, None]
        assert cache.statistics().values_too_large == 2
    await through.aclose()


async def test_a_loaders_value_past_the_limit_is_served_not_cached_and_said_once(
    client: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    big = "z" * (2 * LIMIT)
    async with Cache(
        client, namespace=namespace, policy=Policy(ttl=30.0), max_value_bytes=LIMIT
    ) as cache:
        loader = GatedLoader(big)
        callers = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(50)]
        await loader.started.wait()
        loader.release.set()
        assert await asyncio.gather(*callers) == [big] * 50  # nothing lost
        assert loader.calls == 1
        for i in range(5):  # not cached: each miss loads again
            assert await cache.get_or_load(f"k{i}", ready(big)) == big
        stats = cache.statistics()
        assert stats.values_too_large == 6 and stats.lock_acquired == 6
        assert (
            await client.exists(cache.keys.value("k"), cache.keys.lock(cache.keys.value("k"))) == 0
        )
        assert caplog.text.count("is not cached") == 1  # one warning for the episode
        assert "max_value_bytes=10,000" in caplog.text


async def test_a_stored_record_past_the_limit_is_a_counted_miss_never_decoded(
    client: redis.Redis, namespace: str
) -> None:
    writer_json, reader_json = CountingJson(), CountingJson()
    async with Cache(
        client,
        namespace=namespace,
        policy=Policy(ttl=30.0),
        serializer=writer_json,
        max_value_bytes=None,
    ) as writer:
        await writer.set("k", "w" * (2 * LIMIT))  # another process, with no limit
    async with Cache(
        client,
        namespace=namespace,
        policy=Policy(ttl=30.0),
        serializer=reader_json,
        max_value_bytes=LIMIT,
    ) as reader:
        assert await reader.get("k", default="absent") == "absent"
        stats = reader.statistics()
        assert stats.values_too_large == 1 and stats.misses == 1 and stats.decode_errors == 0
        # A miss like any other: loaded, and the small value replaces the big one.
        loader = ready("small")
        assert await reader.get_or_load("k", loader) == "small"
        assert await reader.get_or_load("k", loader) == "small"
        assert loader.calls == 1
        assert reader_json.decoded == 1  # the small value's hit; never the big record


@pytest.fixture(params=["standalone", "cluster"])
async def deployment(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Client, list[int]]]:
    """A client, and the ports of the servers holding its keys (to read their counters)."""
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        client: Client = redis.Redis(port=server.port)
        ports = [server.port]
    else:
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
        await client.initialize()
        ports = [p for _, p in cluster.startup_nodes]
    yield client, ports
    await client.aclose()


async def sent(ports: list[int]) -> int:
    """Bytes the servers have sent to their clients (INFO stats), all servers together."""
    total = 0
    for port in ports:
        admin = redis.Redis(port=port)
        try:
            total += int((await admin.info("stats"))["total_net_output_bytes"])
        finally:
            await admin.aclose()
    return total


async def test_a_stored_value_past_the_limit_costs_one_short_read_and_no_breaker_count(
    deployment: tuple[Client, list[int]], namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, ports = deployment
    caplog.set_level(logging.WARNING, "aiocacheguard")
    async with Cache(
        client, namespace=namespace, policy=Policy(ttl=30.0), max_value_bytes=LIMIT
    ) as cache:
        await cache.set_many({f"k{i}": i for i in range(20)})
        huge, other = cache.keys.value("huge"), cache.keys.value("other")
        await client.set(huge, b"h" * HUGE)  # another client, with no limit
        await client.set(other, b"o" * HUGE)
        try:
            before = await sent(ports)
            # The lone read, many times: more than the breaker's run of failures.
            for _ in range(10):
                assert await cache.get("huge", default="absent") == "absent"
            # Batched with other keys' reads (a MGET's place; per node on a cluster).
            for _ in range(3):
                reads = await asyncio.gather(
                    cache.get("huge", default="absent"),
                    *(cache.get(f"k{i}") for i in range(20)),
                )
                assert reads == ["absent", *range(20)]
            assert await cache.get_many(["k1", "huge", "k2"]) == [1, None, 2]
            # A miss: the rebuild lock's acquisition must not send it either; the fill
            # replaces it.
            loader = ready("small")
            assert await cache.get_or_load("other", loader) == "small"
            assert loader.calls == 1 and await client.strlen(other) < LIMIT
            assert await sent(ports) - before < SENT_BOUND  # 15 reads of 40 MB: never sent
            stats = cache.statistics()
            assert stats.values_too_large == 10 + 3 + 1 + 1
            assert stats.redis_errors == 0 and stats.breaker_opened == 0
            assert cache.breaker is not None and all(b.closed for b in cache._backend.breakers())
            assert await cache.get("k7") == 7  # every other key still served
            assert caplog.text.count("past max_value_bytes=10,000") == 1  # once an episode
            assert "is read as a miss" in caplog.text
        finally:
            await client.delete(huge, other)


async def test_without_a_limit_reads_are_plain_get_and_mget(
    client: redis.Redis, namespace: str
) -> None:
    big = "b" * (2 * LIMIT)
    async with Cache(
        client, namespace=namespace, policy=Policy(ttl=30.0), max_value_bytes=None
    ) as cache:
        await cache.set_many({f"k{i}": big for i in range(10)})
        bounded = await command_calls(client, "getrange", "strlen", "evalsha")
        gets = await command_calls(client, "get", "mget")
        assert await cache.get("k0") == big  # the lone read
        assert await asyncio.gather(*(cache.get(f"k{i}") for i in range(10))) == [big] * 10
        assert await command_calls(client, "getrange", "strlen", "evalsha") == bounded
        assert await command_calls(client, "get", "mget") - gets >= 2  # (the batch: 1 or 2)
        assert cache.statistics().values_too_large == 0


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_batch_tells_each_kind_of_key_apart(
    redis_server: RedisServer, namespace: str, protocol: int
) -> None:
    """Missing, small, large (read apart), too large and another type, over RESP2 and RESP3."""
    client = redis.Redis(port=redis_server.port, protocol=protocol)
    try:
        async with Cache(
            client, namespace=namespace, policy=Policy(ttl=30.0), max_value_bytes=100_000
        ) as cache:
            await cache.set_many({"small": "s", "large": "l" * 50_000})
            await client.set(cache.keys.value("huge"), b"h" * 200_000)
            await client.hset(cache.keys.value("hash"), "field", "value")
            names = ["small", "missing", "large", "huge", "hash"]
            before = [await command_calls(client, name) for name in ("getrange", "mget")]
            for _ in range(2):  # the lone read (the first), then a batch of the others
                got = await asyncio.gather(*(cache.get(name, default="-") for name in names))
                assert got == ["s", "-", "l" * 50_000, "-", "-"]
            # Each round: the lone read's GETRANGE, and a MGET of the large value alone, read
            # apart; nothing else (a missing key is said in the script's own reply).
            after = [await command_calls(client, name) for name in ("getrange", "mget")]
            assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]
            stats = cache.statistics()
            assert stats.values_too_large == 2 and stats.decode_errors == 2
            assert stats.redis_errors == 0
    finally:
        await client.aclose()
