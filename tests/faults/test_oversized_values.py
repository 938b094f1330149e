"""
Values past the Cache's ``max_value_bytes``: refused on write with a named error before any
I/O, served but not cached when a loader returns one, skipped (not decoded) when found in
Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    Cache,
    ConfigurationError,
    JsonSerializer,
    Policy,
    SerializationError,
    ValueTooLargeError,
)
from aiocacheguard.codec import DEFAULT_MAX_VALUE_BYTES
from aiocacheguard.testing import FaultProxy, RedisServer

from ..helpers import GatedLoader

LIMIT = 10_000


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
