"""
Family (d): foreign data at a cache key. Garbage bytes, text, bytes that look like a record of
a future format version, and a truncated record are each a counted miss, never an error raised
to a caller. Another Redis type at the key (a hash, a list: WRONGTYPE to GET) is
`test_foreign_type.py`, on a standalone Redis and a Cluster; values past ``max_value_bytes``
are `test_oversized_values.py`.

Asserted, for 50 concurrent callers of a key holding each kind of foreign data:
    - ``get`` returns its default and raises nothing;
    - every ``get_or_load`` caller gets the loader's value, and the loader runs once (the
      rebuild lock is taken over the foreign data, so a second process would wait, not load);
    - the key is repaired: afterwards it holds a record of this version, and reads are hits;
    - the foreign value is counted (``decode_errors``), and no lock, subscription or task is left.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.record import FORMAT_VERSION, MAGIC, Record

from ..helpers import GatedLoader
from .checks import assert_nothing_left

FUTURE = MAGIC + bytes([FORMAT_VERSION + 1]) + struct.pack(">B", 0) + b"\x00" * 60


async def plant(direct: redis.Redis, key: bytes, kind: str) -> None:
    if kind == "garbage":
        await direct.set(key, b"\xff\xfe not a record \x00\x01")
    elif kind == "text":
        await direct.set(key, "written by another tool")
    elif kind == "future format":
        await direct.set(key, FUTURE)
    else:
        assert kind == "truncated record"
        await direct.set(key, MAGIC + bytes([FORMAT_VERSION]) + b"\x00" * 10)


@pytest.mark.parametrize("kind", ["garbage", "text", "future format", "truncated record"])
async def test_foreign_data_is_a_counted_miss_and_repaired(
    client: redis.Redis, namespace: str, kind: str
) -> None:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        key = cache.keys.value("k")
        await plant(client, key, kind)
        assert await cache.get("k", default="default") == "default"
        loader = GatedLoader("loaded")
        callers = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(50)]
        await asyncio.wait_for(loader.started.wait(), 5)
        assert await client.exists(cache.keys.lock(key)) == 1  # guarded like any miss
        loader.release.set()
        async with asyncio.timeout(5):
            assert await asyncio.gather(*callers) == ["loaded"] * 50
        assert loader.calls == 1
        # Repaired: a record of this version, read as a hit from now on.
        assert await client.type(key) == b"string"
        stored = await client.get(key)
        assert isinstance(stored, bytes) and Record.decode(stored).payload == b'"loaded"'
        assert await cache.get_or_load("k", loader) == "loaded" and loader.calls == 1
        stats = cache.statistics()
        assert stats.decode_errors >= 1 and stats.redis_errors == 0
    await assert_nothing_left(client, namespace)
