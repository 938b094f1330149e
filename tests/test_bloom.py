"""The Bloom filter and negative caching against real Redis."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from aiocacheguard import BloomFilter, Cache, ConfigurationError, Policy


def test_sizing_follows_the_formulas() -> None:
    f = BloomFilter("f", capacity=100_000, error_rate=0.01)
    assert f.bits == math.ceil(-100_000 * math.log(0.01) / math.log(2) ** 2) == 958_506
    assert f.hashes == round(f.bits / 100_000 * math.log(2)) == 7
    positions = f.positions("user:1")
    assert positions == f.positions(b"user:1")  # str is UTF-8
    assert all(0 <= p < f.bits for p in positions) and len(positions) == 7


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity": 0, "error_rate": 0.01}, "capacity"),
        ({"capacity": -5, "error_rate": 0.01}, "capacity"),
        ({"capacity": 1.5, "error_rate": 0.01}, "capacity"),
        ({"capacity": 10, "error_rate": 0.0}, "error_rate"),
        ({"capacity": 10, "error_rate": 0.5}, "error_rate"),
        ({"capacity": 10, "error_rate": math.nan}, "error_rate"),
        ({"capacity": 10**10, "error_rate": 1e-9}, "capacity"),  # over 2^32 bits
    ],
)
def test_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BloomFilter("f", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_unbound_filter_says_what_to_do() -> None:
    f = BloomFilter("f", capacity=10, error_rate=0.01)
    with pytest.raises(ConfigurationError, match=r"Cache\(\.\.\., bloom=filter\)"):
        asyncio.run(f.contains("x"))


async def make(
    client: redis.Redis, namespace: str, capacity: int, error_rate: float
) -> tuple[Cache, BloomFilter]:
    bloom = BloomFilter("ids", capacity=capacity, error_rate=error_rate)
    cache = Cache(client, namespace=namespace, policy=Policy(ttl=60.0), bloom=bloom)
    return cache, bloom


@pytest.mark.slow
@pytest.mark.parametrize("error_rate", [0.01, 0.001])
async def test_no_false_negatives_and_measured_false_positive_rate(
    client: redis.Redis, namespace: str, error_rate: float
) -> None:
    n = 100_000
    cache, bloom = await make(client, namespace, n, error_rate)
    inserted = [f"user:{i}" for i in range(n)]
    assert await bloom.add_many(inserted, batch=2000) == n
    answers: list[bool] = []
    for start in range(0, n, 5000):
        answers += await bloom.contains_many(inserted[start : start + 5000])
    assert all(answers), "a false negative"

    absent = [f"ghost:{i}" for i in range(n)]
    started = time.perf_counter()
    positives = 0
    for start in range(0, n, 5000):
        positives += sum(await bloom.contains_many(absent[start : start + 5000]))
    elapsed = time.perf_counter() - started
    rate = positives / n
    print(f"error_rate={error_rate}: measured {rate:.5f}; contains_many {n / elapsed:,.0f}/s")
    assert rate <= 1.5 * error_rate
    await cache.aclose()


async def test_loader_calls_with_and_without_the_filter(
    client: redis.Redis, namespace: str
) -> None:
    """10,000 lookups of 1,000 absent ids (10 rounds within negative_ttl)."""
    ids = [f"user:{i}" for i in range(1000)]
    present = [f"user:{i}" for i in range(1000, 2000)]
    calls = 0

    async def find() -> None:
        nonlocal calls
        calls += 1

    # Without a filter: the loader once per id, then the negative result is cached.
    async with Cache(client, namespace=namespace + "-plain", policy=Policy(ttl=60.0)) as plain:
        for _ in range(10):
            await asyncio.gather(*(plain.get_or_load(i, find) for i in ids))
        assert calls == 1000
        assert plain.statistics().negative_hits == 9000

    # With a filter of the ids that exist: at most its false positives reach the loader.
    calls = 0
    bloom = BloomFilter("users", capacity=10_000, error_rate=0.01)
    policy = Policy(ttl=60.0, negative_ttl=None)  # not even negative caching helps here
    async with Cache(client, namespace=namespace, policy=policy, bloom=bloom) as guarded:
        await bloom.add_many(present)
        false_positives = sum(await bloom.contains_many(ids))
        for _ in range(10):
            await asyncio.gather(*(guarded.get_or_load(i, find) for i in ids))
        assert calls == 10 * false_positives <= 10 * 30
        assert guarded.statistics().bloom_rejected == 10 * (1000 - false_positives)


async def test_fills_and_sets_add_their_keys(client: redis.Redis, namespace: str) -> None:
    cache, bloom = await make(client, namespace, 1000, 0.01)
    async with cache:

        async def load() -> str:
            return "v"

        async def absent() -> str | None:
            return None

        await bloom.add("seed")  # the bitmap exists from the first add; before, it fails open
        assert await bloom.contains("new") is False
        # The filter says "absent" for a never-seen key: the loader is not asked...
        assert await cache.get_or_load("new", load) is None
        await cache.set("new", "written")
        assert await bloom.contains("new") is True
        # ...and once a value was written through the Cache, it is found.
        assert await cache.get_or_load("new", load) == "written"
        await bloom.add("other")
        assert await cache.get_or_load("other", load) == "v"
        await bloom.add("ghost")
        assert await cache.get_or_load("ghost", absent) is None
        assert await bloom.contains_many(["ghost"]) == [True]


async def test_deleted_bitmap_fails_open(client: redis.Redis, namespace: str) -> None:
    cache, bloom = await make(client, namespace, 1000, 0.01)
    async with cache:
        await bloom.add("a")
        await client.delete(bloom.key)

        async def load() -> str:
            return "from the database"

        assert await bloom.contains("never-added") is True
        assert await cache.get_or_load("never-added", load) == "from the database"
        assert cache.statistics().bloom_fail_open == 1


async def test_redis_error_in_the_filter_fails_open(client: redis.Redis, namespace: str) -> None:
    cache, bloom = await make(client, namespace, 1000, 0.01)
    async with cache:
        await client.set(bloom.key, "not a bitmap")  # GETBIT still works on strings...
        await client.sadd(bloom.key + b"x", "y")
        await client.rename(bloom.key + b"x", bloom.key)  # ...but not on a set: WRONGTYPE

        async def load() -> str:
            return "from the database"

        assert await cache.get_or_load("k", load) == "from the database"
        stats = cache.statistics()
        assert stats.bloom_fail_open == 1 and stats.redis_errors >= 1


async def test_rebuild_while_readers_run_never_gives_a_false_negative(
    client: redis.Redis, namespace: str
) -> None:
    cache, bloom = await make(client, namespace, 20_000, 0.01)
    async with cache:
        old = [f"old:{i}" for i in range(5000)]
        await bloom.add_many(old)
        kept = old[:2500]  # still in the source of truth after the rebuild
        stop = asyncio.Event()
        false_negatives = 0
        checks = 0

        async def reader() -> None:
            nonlocal false_negatives, checks
            while not stop.is_set():
                answers = await bloom.contains_many(kept[:500])
                false_negatives += answers.count(False)
                checks += len(answers)

        async def source() -> AsyncIterator[str]:
            for i, item in enumerate(kept + [f"new:{i}" for i in range(5000)]):
                if i % 500 == 0:
                    await asyncio.sleep(0)  # let readers and writers run mid-rebuild
                    await bloom.add(f"during:{i}")  # a write during the rebuild
                yield item

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        assert await bloom.rebuild(source()) == 7500
        stop.set()
        await asyncio.gather(*readers)
        assert false_negatives == 0 and checks > 0
        assert all(await bloom.contains_many(kept + [f"new:{i}" for i in range(5000)]))
        # Writes made during the rebuild survived the swap.
        assert all(await bloom.contains_many([f"during:{i}" for i in range(0, 7500, 500)]))
        # Dropped items are now mostly absent.
        assert sum(await bloom.contains_many(old[2500:])) < 100
        assert await client.exists(bloom.key + b":rebuild") == 0


async def test_negative_and_miss_are_told_apart(client: redis.Redis, namespace: str) -> None:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=60.0)) as cache:

        async def absent() -> str | None:
            return None

        sentinel = object()
        assert await cache.get("k", default=sentinel) is sentinel  # a miss
        assert await cache.get_or_load("k", absent) is None
        assert await cache.get("k", default=sentinel) is None  # a cached "absent"
        assert await cache.get_or_load("k", absent) is None
        stats = cache.statistics()
        assert (stats.negative_hits, stats.loader_calls) == (2, 1)
