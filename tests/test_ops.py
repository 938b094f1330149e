"""
Bulk operations (aiocacheguard.bulk) and the operator's API (aiocacheguard.ops), on a real
standalone server and a real cluster. The tests call the functions; `Cache.get_many`,
`set_many`, `warm` and `clear` are thin wrappers over them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocacheguard import BackendUnavailable, Breaker, Cache, CacheClosedError, Policy
from aiocacheguard.backend import RedisClient
from aiocacheguard.bulk import NamespaceKeys, clear, get_many, redis_glob, set_many, warm
from aiocacheguard.errors import ConfigurationError
from aiocacheguard.ops import (
    Check,
    clear_preview,
    doctor,
    inspect,
    server_checks,
    stats,
    top_keys,
)
from aiocacheguard.testing import FaultProxy, RedisClusterServer, RedisServer

from .helpers import command_calls


@pytest.fixture(params=["standalone", "cluster"])
async def any_client(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    client: RedisClient
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        client = redis.Redis(host=server.host, port=server.port)
    else:
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
    yield client
    await client.aclose()


@pytest.fixture
async def any_cache(any_client: RedisClient, namespace: str) -> AsyncIterator[Cache]:
    # Bulk semantics, not budgets: a thousand fills sent at once share a budget that counts
    # from the ask, which a 2-CPU machine running other suites can spend on CPU alone.
    async with Cache(
        any_client, namespace=namespace, policy=Policy(ttl=60.0), command_timeout=5.0
    ) as cache:
        yield cache


async def test_set_many_then_get_many(any_cache: Cache) -> None:
    values = {f"k{i}": {"n": i} for i in range(2000)}
    await set_many(any_cache, values, ttl=30.0)
    keys = [*values, "absent"]
    got = await get_many(any_cache, keys, default="none")
    assert got == [*values.values(), "none"]
    assert await any_cache.get("k7") == {"n": 7}


async def test_set_many_is_pipelined(client: redis.Redis, cache: Cache) -> None:
    # The commands a client sends (under max_value_bytes a batch of reads is one EVALSHA of
    # READ_WITHIN, a lone read a GETRANGE); not GET, which Redis also counts inside scripts.
    sent = ("evalsha", "getrange", "mget")
    before = await command_calls(client, *sent)
    await set_many(cache, {f"k{i}": i for i in range(500)})
    assert await get_many(cache, [f"k{i}" for i in range(500)]) == list(range(500))
    # 500 fills and one MGET's worth of reads, not 500 separate GETs.
    assert await command_calls(client, *sent) - before <= 500 + 4


async def test_set_many_supersedes_a_held_lock(client: redis.Redis, cache: Cache) -> None:
    lock = cache.keys.value("k") + b":lock"
    await client.set(lock, b"someone", px=10_000)
    await set_many(cache, {"k": 1})
    assert await client.exists(lock) == 0  # as Cache.set: the rebuild in progress is fenced out
    assert await cache.get("k") == 1


async def test_get_many_checks_every_key_first(cache: Cache) -> None:
    from aiocacheguard.errors import InvalidKeyError

    with pytest.raises(InvalidKeyError):
        await get_many(cache, ["ok", ""])
    with pytest.raises(InvalidKeyError):
        await set_many(cache, {"ok": 1, "": 2})
    assert await cache.get("ok") is None


async def test_warm_values_and_loaders_with_bounded_concurrency(any_cache: Cache) -> None:
    running = peak = 0
    seen: list[int] = []

    def loader(i: int) -> Callable[[], object]:
        async def load() -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            import asyncio

            await asyncio.sleep(0.001)
            running -= 1
            return i

        return load

    async def items() -> AsyncIterator[tuple[str, object]]:
        for i in range(300):
            yield (f"v{i}", i) if i % 2 else (f"v{i}", loader(i))

    count = await warm(any_cache, items(), concurrency=8, progress=seen.append)
    assert count == 300 and seen[-1] == 300 and len(seen) == 300
    assert peak <= 8
    assert await get_many(any_cache, [f"v{i}" for i in range(300)]) == list(range(300))


async def test_warm_stops_at_the_first_failure(cache: Cache) -> None:
    async def broken() -> object:
        raise RuntimeError("database down")

    items = [("a", 1), ("b", broken), *((f"c{i}", i) for i in range(1000))]
    with pytest.raises(RuntimeError, match="database down"):
        await warm(cache, items, concurrency=1)
    assert await cache.get("a") == 1
    assert await cache.get("c999") is None
    with pytest.raises(ConfigurationError):
        await warm(cache, [], concurrency=0)


async def test_clear_removes_only_the_pattern_of_the_namespace(any_cache: Cache) -> None:
    other_ns = f"other-{uuid.uuid4().hex[:8]}"
    client = any_cache._backend.client
    async with Cache(client, namespace=other_ns, policy=Policy(ttl=60.0)) as other:
        await set_many(other, {"user:1": 1})
        await set_many(any_cache, {f"user:{i}": i for i in range(1500)} | {"order:1": 1})
        lock = any_cache.keys.value("user:3") + b":lock"
        bloom = b"{" + any_cache.namespace.encode() + b":user:ids}:bloom"
        await client.set(lock, b"token", px=10_000)
        await client.set(bloom, b"\x00")
        seen: list[int] = []
        assert await clear(any_cache, "user:*", progress=seen.append) == 1500
        assert seen and seen[-1] == 1500
        assert await any_cache.get("order:1") == 1
        assert await client.exists(lock, bloom) == 2  # kept unless asked for
        assert await other.get("user:1") == 1
        assert await clear(any_cache, "user:*", locks=True, blooms=True) == 2
        assert await clear(any_cache) == 1
        assert await other.get("user:1") == 1


def test_redis_glob_matches_as_redis_does() -> None:
    cases = [
        (b"user:*", b"user:1", True),
        (b"user:*", b"usr:1", False),
        (b"a?c", b"abc", True),
        (b"[a-c]x", b"bx", True),
        (b"[^a-c]x", b"bx", False),
        (b"\\*", b"*", True),
        (b"\\*", b"a", False),
        (b"a.b", b"axb", False),
    ]
    for pattern, key, expected in cases:
        assert bool(redis_glob(pattern).fullmatch(key)) is expected, (pattern, key)
    with pytest.raises(ConfigurationError):
        redis_glob(b"[z-a]")


async def test_clear_finds_keys_whose_pattern_ends_in_a_backslash_or_an_open_class(
    any_cache: Cache,
) -> None:
    """The user's glob is embedded in ``{ns:PATTERN}*``: ``a\\`` used to escape the ``}``."""
    keys = ["a\\", "a\\b", "a[b", "ab", "a]", "a*", "a", "a-", "xyz"]
    await set_many(any_cache, dict.fromkeys(keys, 1))
    client = any_cache._backend.client
    for pattern in ["a\\", "a\\*", "a[b", "a[", "a]", "a\\*", "a[\\]b]", "a[^b]", "[a-b]*", "a[]"]:
        found = NamespaceKeys(any_cache.namespace, pattern, values=True, locks=False, blooms=False)
        scanned = {key async for batch in found.scan(client) for key in batch}
        expected = {
            any_cache.keys.value(k)
            for k in keys
            if redis_glob(pattern.encode()).fullmatch(k.encode())
        }
        assert scanned == expected, pattern
    assert await clear(any_cache, "a\\") == 1
    assert await any_cache.get("a\\") is None and await any_cache.get("a\\b") == 1


async def test_clear_after_aclose_raises_and_sends_nothing(
    client: redis.Redis, namespace: str
) -> None:
    cache = Cache(client, namespace=namespace, policy=Policy(ttl=60.0))
    await cache.set("k", 1)
    await cache.aclose()
    with pytest.raises(CacheClosedError):
        await cache.clear()
    assert await client.exists(cache.keys.value("k")) == 1


async def test_clear_goes_through_the_breaker(redis_server: RedisServer, namespace: str) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        breaker = Breaker(consecutive_failures=2, open_for=60.0)
        async with Cache(
            client, namespace=namespace, policy=Policy(ttl=60.0), breaker=breaker
        ) as cache:
            proxy.refuse()
            for _ in range(2):  # its failures count towards opening the breaker
                with pytest.raises(BackendUnavailable):
                    await cache.clear()
            stats = cache.statistics()
            assert stats.breaker_opened == 1 and stats.redis_errors == 2
            with pytest.raises(BackendUnavailable, match="circuit breaker is open"):
                await cache.clear()  # refused at once, as every other call
            assert cache.statistics().short_circuited == 1
        await client.aclose()


def test_namespace_keys_tells_kinds_by_suffix() -> None:
    keys = NamespaceKeys("ns", "user:*", values=True, locks=True, blooms=False)
    assert keys.match == b"{ns:user:*}*"
    assert keys.kind(b"{ns:user:1}") == "value"
    assert keys.kind(b"{ns:user:1}:lock") == "lock"
    assert keys.kind(b"{ns:user:1}:bloom") is None  # not asked for
    assert keys.kind(b"{ns:order:1}") is None
    assert keys.kind(b"{other:user:1}") is None


# ------------------------------------------------------------------------------------------
# ops: doctor's rules (pure), then stats, inspect, keys --top and clear's dry run on servers


def _rows(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


TUNED = {
    "maxmemory": str(2**30),
    "maxmemory-policy": "allkeys-lru",
    "save": "",
    "appendonly": "no",
    "latency-monitor-threshold": "100",
    "slowlog-log-slower-than": "10000",
    "slowlog-max-len": "128",
    "lazyfree-lazy-eviction": "yes",
    "maxclients": "10000",
}


def test_doctor_rules() -> None:
    info = {"redis_version": "7.2.4", "used_memory": 2**20, "connected_clients": 5}
    assert all(c.status == "ok" for c in server_checks(info, TUNED, pool_size=100))
    rows = _rows(server_checks(info, {**TUNED, "maxmemory": "0", "maxmemory-policy": "noeviction"}))
    assert rows["maxmemory"].status == rows["maxmemory-policy"].status == "fail"
    assert rows["maxmemory-policy"].fix == "maxmemory-policy allkeys-lru"
    rows = _rows(server_checks(info, {**TUNED, "maxmemory-policy": "volatile-lru"}))
    assert rows["maxmemory-policy"].status == "warn"
    rows = _rows(server_checks(info, {**TUNED, "save": "3600 1", "appendonly": "yes"}))
    assert rows["persistence"].status == "warn" and "AOF" in rows["persistence"].detail
    rows = _rows(server_checks(info, {**TUNED, "maxclients": "200"}, pool_size=100))
    assert rows["maxclients"].status == "warn"
    rows = _rows(server_checks({**info, "redis_version": "6.2.0"}, TUNED))
    assert rows["client tracking"].status == "ok" and rows["sharded pub/sub"].status == "warn"
    rows = _rows(server_checks({**info, "evicted_keys": 500, "keyspace_misses": 1000}, TUNED))
    assert rows["evictions"].status == "warn"
    rows = _rows(server_checks(info, TUNED, {"cluster_state": "fail"}))
    assert rows["cluster"].status == "fail"
    # CONFIG refused (a managed service): INFO's figures are used, the rest is "unknown".
    info_only = {**info, "maxmemory": 2**30, "maxmemory_policy": "allkeys-lfu"}
    rows = _rows(server_checks(info_only, None))
    assert rows["maxmemory-policy"].status == "ok" and rows["slowlog"].status == "warn"


async def test_doctor_on_a_server(any_client: RedisClient) -> None:
    checks = await doctor(any_client)
    assert {"maxmemory", "maxmemory-policy", "slowlog", "sharded pub/sub"} <= _rows(checks).keys()
    if isinstance(any_client, RedisCluster):
        assert len({c.node for c in checks}) == 3
        assert all(c.status == "ok" for c in checks if c.name == "cluster")


async def test_stats_counts_entries_by_state(any_client: RedisClient, namespace: str) -> None:
    policy = Policy(ttl=60.0, soft_ttl=0.001, jitter=0.0)
    async with Cache(any_client, namespace=namespace, policy=policy) as cache:
        await set_many(cache, {f"k{i}": i for i in range(100)})
        await cache.set("absent", None)
    await any_client.set(f"{{{namespace}:k3}}:lock".encode(), b"token")  # no lease: stuck
    await any_client.set(f"{{{namespace}:k4}}:lock".encode(), b"token", px=5000)
    await any_client.set(f"{{{namespace}:ids}}:bloom".encode(), b"\x0f\x00")
    result = await stats(any_client, namespace, sample=10**9, interval=0.05)
    found = result.namespace
    assert found is not None and not found.sampled
    assert (found.entries, found.negative, found.soft_expired, found.locks) == (101, 1, 100, 2)
    assert [lock.key for lock in found.stuck_locks] == ["k3"]
    assert [(b.name, b.bits, b.set_bits, b.fill_ratio) for b in found.blooms] == [
        ("ids", 16, 4, 0.25)
    ]
    assert result.server.keys >= 104 and result.server.interval >= 0.05


async def test_stats_samples_a_large_keyspace(client: redis.Redis, cache: Cache) -> None:
    await set_many(cache, {f"k{i}": i for i in range(3000)})
    found = (await stats(client, cache.namespace, sample=500, interval=0)).namespace
    assert found is not None and found.sampled and found.examined < 3000
    assert 1000 < found.entries < 9000  # scaled up from the sample


async def test_inspect_decodes_the_header(client: redis.Redis, cache: Cache) -> None:
    await cache.set("k", {"a": [1, 2]}, ttl=30.0)
    lock = cache.keys.value("k") + b":lock"
    await client.set(lock, b"holder-token", px=4000)
    seen = await inspect(client, cache.namespace, "k")
    assert seen.exists and seen.serializer == "msgspec-json" and seen.format_version == 2
    assert seen.value == {"a": [1, 2]} and seen.value_shown and seen.negative is False
    assert seen.expires_at is not None and seen.stored_at is not None
    assert 29 < seen.expires_at - seen.stored_at <= 30.0
    assert seen.ttl_left is not None and 0 < seen.ttl_left <= 30
    assert seen.lock_holder == "holder-token"
    assert seen.lock_lease_left is not None and 0 < seen.lock_lease_left <= 4
    assert not (await inspect(client, cache.namespace, "missing")).exists
    await client.hset(cache.keys.value("h"), "f", "v")
    assert "hash" in (await inspect(client, cache.namespace, "h")).problem


async def test_top_keys_and_clear_preview(any_cache: Cache) -> None:
    client = any_cache._backend.client
    # Sizes far apart: MEMORY USAGE counts allocator size classes, not bytes.
    await set_many(any_cache, {f"k{i}": "x" * 2**i for i in range(4, 18)} | {"other": 1})
    top = await top_keys(client, any_cache.namespace, "k*", top=3)
    assert [k.key for k in top.keys] == ["k17", "k16", "k15"] and top.matched == 14
    assert top.keys[0].bytes > 2**17 and top.keys[0].ttl_left is not None
    preview = await clear_preview(client, any_cache.namespace, "k1*", examples=3)
    assert preview.count == 8 and len(preview.examples) == 3
    assert await any_cache.get("k10") == "x" * 1024  # nothing removed
