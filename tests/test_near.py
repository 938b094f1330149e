"""
The L1 wired into the Cache (``Cache(local=LocalCache(...))``, aiocacheguard.near) against real
servers: hits without I/O, bounded by the record's soft expiry and the policy's local_ttl;
invalidation of what any client changes (another process, a plain client's DEL, FLUSHDB); the
writer reading its own writes; a lost invalidation connection; a read overtaken by an
invalidation; a refused listener; and the L1 as the fallback chain's step while Redis is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocacheguard import Breaker, Cache, ConfigurationError, LocalCache, Policy
from aiocacheguard.testing import FaultProxy, RedisClusterServer, RedisServer, _free_port_pair

from .helpers import Clock, command_calls, library_tasks, limited_client, wait_until


def l1_cache(client: redis.Redis | RedisCluster, namespace: str, **options: Any) -> Cache:
    policy = options.pop("policy", Policy(ttl=30.0))
    local = options.pop("local", LocalCache())
    return Cache(client, namespace=namespace, policy=policy, local=local, **options)


@pytest.fixture
async def near(client: redis.Redis, namespace: str) -> AsyncIterator[Cache]:
    async with l1_cache(client, namespace) as cache:
        yield cache
    assert not library_tasks(), "aclose() left library tasks behind"


async def reads(client: redis.Redis) -> int:
    return await command_calls(client, "get", "getrange", "mget")


async def held(cache: Cache, key: str, value: object) -> None:
    """
    Wait until the L1 serves ``value`` for ``key`` (a Redis read fills it), once the
    announcements of every earlier write have arrived: a late echo of the Cache's own write
    would otherwise drop the entry after this returned.
    """
    near = cache._near
    assert near is not None
    if not isinstance(cache._backend.client, RedisCluster):
        # One listener, in Redis's order: a write after all others is announced after them.
        barrier = cache.keys.value(f"barrier-{uuid.uuid4().hex}")
        arrived = asyncio.Event()
        previous = near.on_change

        def watch(keys: Sequence[bytes] | None) -> None:
            if previous is not None:
                previous(keys)
            if keys is None or barrier in keys:
                arrived.set()

        near.on_change = watch
        try:
            await cache._backend.client.set(barrier, b"")
            async with asyncio.timeout(5):
                await arrived.wait()
        finally:
            near.on_change = previous

    async def served() -> bool:
        before = cache.statistics().local_hits
        return await cache.get(key) == value and cache.statistics().local_hits > before

    async with asyncio.timeout(5):
        while not await served():
            await asyncio.sleep(0.005)


async def test_hits_after_the_first_read_cost_no_redis_command(
    near: Cache, client: redis.Redis
) -> None:
    calls = 0

    async def load() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"n": 1}

    assert await near.get_or_load("k", load) == {"n": 1}
    await held(near, "k", {"n": 1})
    before = await reads(client)
    for _ in range(200):
        assert await near.get_or_load("k", load) == {"n": 1}
        assert await near.get("k") == {"n": 1}
    assert await reads(client) == before  # not one GET (INFO itself is not counted)
    stats = near.statistics()
    assert calls == 1 and stats.local_hits >= 400


async def test_an_l1_entry_never_outlives_the_soft_ttl_or_the_local_ttl(
    client: redis.Redis, namespace: str
) -> None:
    clock = Clock()
    policy = Policy(ttl=60.0, soft_ttl=10.0, jitter=0.0)
    async with l1_cache(
        client, namespace, policy=policy, clock=clock, local=LocalCache(ttl=3600.0)
    ) as cache:
        loads = 0

        async def load() -> int:
            nonlocal loads
            loads += 1
            return loads

        assert await cache.get_or_load("soft", load) == 1
        await held(cache, "soft", 1)
        clock.now += 9.9
        before = await reads(client)
        assert await cache.get_or_load("soft", load) == 1
        assert await reads(client) == before  # still in the L1
        clock.now += 0.2  # past the soft TTL: the L1 let go; Redis says stale, refresh
        assert await cache.get_or_load("soft", load) == 1
        assert await reads(client) == before + 1
        await wait_until(lambda: loads == 2)

        # A policy's local_ttl shortens the L1's; 0 keeps entries out of it.
        short = Policy(ttl=60.0, local_ttl=2.0)
        assert await cache.get_or_load("short", load, policy=short) == 3
        await cache.get_or_load("short", load, policy=short)  # fills the L1
        before = await reads(client)
        await cache.get_or_load("short", load, policy=short)
        assert await reads(client) == before
        clock.now += 2.1
        await cache.get_or_load("short", load, policy=short)
        assert await reads(client) == before + 1
        never = Policy(ttl=60.0, local_ttl=0)
        await cache.get_or_load("never", load, policy=never)
        hits = cache.statistics().local_hits
        for _ in range(5):
            await cache.get_or_load("never", load, policy=never)
        assert cache.statistics().local_hits == hits


async def test_a_calls_shorter_local_ttl_is_honoured_on_an_entry_filled_under_a_longer_one(
    client: redis.Redis, namespace: str
) -> None:
    """An entry filled under the LocalCache's hour was served to a policy asking for 2 s."""
    clock = Clock()
    async with l1_cache(client, namespace, clock=clock, local=LocalCache(ttl=3600.0)) as cache:
        loads = 0

        async def load() -> int:
            nonlocal loads
            loads += 1
            return loads

        await cache.set("k", 0)
        await held(cache, "k", 0)  # filled under the LocalCache's ttl (the Cache's policy)
        short = Policy(ttl=60.0, local_ttl=2.0)
        clock.now += 1.0
        before = await reads(client)
        assert await cache.get_or_load("k", load, policy=short) == 0
        assert await reads(client) == before  # younger than 2 s: from the L1
        clock.now += 1.1
        assert await cache.get_or_load("k", load, policy=short) == 0
        assert await reads(client) == before + 1  # 2.1 s old: read again, not served
        assert await cache.get("k") == 0  # the Cache's own policy: its entry, refilled
        assert await reads(client) == before + 1 and loads == 0


_WRITER = """
import asyncio, json, sys
import redis.asyncio as redis
from aiocacheguard import Cache, LocalCache, Policy

async def main(port, namespace):
    client = redis.Redis(port=port)
    local = LocalCache()
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0), local=local) as cache:
        print("ready", flush=True)
        for line in sys.stdin:
            await cache.set("k", json.loads(line))
            print("written", flush=True)
    await client.aclose()

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


async def test_a_write_by_another_process_reaches_this_l1(
    near: Cache, redis_server: RedisServer, namespace: str
) -> None:
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WRITER,
        str(redis_server.port),
        namespace,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert await writer.stdout.readline() == b"ready\n"
            delays = []
            for version in range(1, 21):
                if version > 1:
                    await held(near, "k", version - 1)  # the old value is in the L1
                writer.stdin.write(json.dumps(version).encode() + b"\n")
                await writer.stdin.drain()
                assert await writer.stdout.readline() == b"written\n"
                start = time.perf_counter()  # set() has returned in the other process
                while (seen := await near.get("k")) != version:
                    assert seen in (None, version - 1)
                    await asyncio.sleep(0)
                delays.append(time.perf_counter() - start)
    finally:
        writer.stdin.close()
        await writer.wait()
    assert max(delays) < 1.0  # sub-millisecond on loopback; generous for a shared machine
    assert near.statistics().local_hits > 0


async def test_a_plain_clients_del_and_flushdb_reach_the_l1(
    near: Cache, redis_server: RedisServer
) -> None:
    await near.set("a", 1)
    await near.set("b", 2)
    await held(near, "a", 1)
    await held(near, "b", 2)
    # A separate server's data is not this namespace's: FLUSHDB needs a server of its own.
    outsider = redis.Redis(port=redis_server.port)
    try:
        await outsider.delete(near.keys.value("a"))
        async with asyncio.timeout(5):
            while await near.get("a", default="gone") != "gone":
                await asyncio.sleep(0.001)
        assert await near.get("b") == 2
    finally:
        await outsider.aclose()


async def test_flushdb_empties_every_l1_of_the_server(namespace: str) -> None:
    with RedisServer() as server:  # FLUSHDB: a server no other test uses
        client = redis.Redis(port=server.port)
        outsider = redis.Redis(port=server.port)
        try:
            async with l1_cache(client, namespace) as cache:
                await cache.set("a", 1)
                await held(cache, "a", 1)
                await outsider.flushdb()
                async with asyncio.timeout(5):
                    while await cache.get("a", default="gone") != "gone":
                        await asyncio.sleep(0.001)
        finally:
            await client.aclose()
            await outsider.aclose()


async def test_the_writer_reads_its_own_writes_at_once(near: Cache) -> None:
    for version in range(50):
        await near.set("k", version)
        assert await near.get("k") == version  # no wait for the announcement
        await held(near, "k", version)
    await near.delete("k")
    assert await near.get("k", default="gone") == "gone"

    async def load() -> int:
        return -1

    await near.set("k", 7)
    await held(near, "k", 7)
    assert await near.refresh("k", load) == -1
    assert await near.get("k") == -1


async def test_a_lost_invalidation_connection_never_leaves_the_old_value_served(
    near: Cache, client: redis.Redis
) -> None:
    assert near._near is not None
    (listener,) = near._near.listeners
    await near.set("k", "old")
    await held(near, "k", "old")
    # Kill the listener and write in one pipeline: the write happens while nobody listens, so
    # its invalidation is lost for good. The L1 must not serve "old" once tracking is back.
    async with client.pipeline(transaction=False) as pipe:
        pipe.client_kill_filter(_type="pubsub")
        pipe.set(near.keys.value("k"), await _record_of(near, "new"))
        await pipe.execute()
    await wait_until(lambda: listener.restored >= 2)
    assert await near.get("k") == "new"
    stats = near.statistics()
    assert stats.local_bypassed == 1
    await held(near, "k", "new")  # and it serves again


async def _record_of(cache: Cache, value: object) -> bytes:
    """The bytes the Cache stores for ``value`` (written by a plain client in the tests)."""
    encoded = cache._codec.encode(value, cache.policy, compute_time=0.0, rkey=b"")
    assert encoded is not None
    return encoded[0]


async def test_a_read_overtaken_by_an_invalidation_is_not_kept(
    redis_server: RedisServer, namespace: str
) -> None:
    # The read leaves its placeholder before the GET leaves; the GET is held at the proxy
    # while another client writes the key; the invalidation arrives first; the reply that
    # follows must not be kept (Redis's own reference calls this the race to guard).
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port)
        outsider = redis.Redis(port=redis_server.port)
        try:
            async with l1_cache(client, namespace) as cache:
                assert cache._near is not None and cache._local is not None
                await cache.set("k", "old")
                rkey = cache.keys.value("k")
                invalidations = cache._local.invalidations
                proxy.hold()
                reading = asyncio.create_task(cache.get("k"))
                await proxy.wait_held(1)
                await outsider.set(rkey, await _record_of(cache, "new"))
                await wait_until(lambda: cache._local.invalidations > invalidations)  # type: ignore[union-attr]
                proxy.unhold()
                assert await reading == "new"
                assert cache._local.get(rkey) is None  # not kept: it may predate the write
        finally:
            await client.aclose()
            await outsider.aclose()


async def test_an_l1_whose_listener_is_refused_serves_nothing_and_says_so(
    client: redis.Redis, redis_server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with limited_client(client, redis_server, "client|tracking") as limited:
        with caplog.at_level(logging.ERROR, logger="aiocacheguard"):
            async with l1_cache(limited, namespace) as cache:
                await cache.set("k", 1)
                for _ in range(20):
                    assert await cache.get("k") == 1
                assert cache.statistics().local_hits == 0
        assert any("L1 stays off" in r.getMessage() for r in caplog.records)


async def test_redis_down_serves_the_l1_entry_within_stale_if_error(
    redis_server: RedisServer, namespace: str
) -> None:
    clock = Clock()
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        try:
            async with l1_cache(
                client,
                namespace,
                policy=Policy(ttl=60.0, stale_if_error=300.0, jitter=0.0),
                local=LocalCache(ttl=1.0),
                clock=clock,
                command_timeout=0.2,
                breaker=Breaker(),
            ) as cache:
                calls = 0

                async def load() -> str:
                    nonlocal calls
                    calls += 1
                    return f"v{calls}"

                assert await cache.get_or_load("k", load) == "v1"
                await held(cache, "k", "v1")
                proxy.blackhole()
                clock.now += 5.0  # past the L1's ttl, the record still within its TTL
                assert await cache.get_or_load("k", load) == "v1"
                # Once the listener finds its connection dead, the entry is kept aside for
                # this step only; past the record's TTL plus the grace it is not served.
                assert cache._near is not None
                await wait_until(lambda: cache.statistics().local_bypassed == 1, within=10)
                clock.now += 100.0
                assert await cache.get_or_load("k", load) == "v1"
                assert calls == 1
                assert cache.statistics().stale_served == 2
                clock.now += 300.0
                assert await cache.get_or_load("k", load) == "v2"
                await proxy.heal()
        finally:
            await client.aclose()


async def test_without_stale_if_error_redis_down_calls_the_loader(
    redis_server: RedisServer, namespace: str
) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        try:
            clock = Clock()
            async with l1_cache(
                client, namespace, local=LocalCache(ttl=1.0), clock=clock, command_timeout=0.2
            ) as cache:
                calls = 0

                async def load() -> int:
                    nonlocal calls
                    calls += 1
                    return calls

                assert await cache.get_or_load("k", load) == 1
                await held(cache, "k", 1)
                proxy.blackhole()
                clock.now += 5.0
                assert await cache.get_or_load("k", load) == 2
                await proxy.heal()
        finally:
            await client.aclose()


def test_local_must_be_a_localcache(client: redis.Redis) -> None:
    with pytest.raises(ConfigurationError, match="local"):
        Cache(client, namespace="x", policy=Policy(ttl=1.0), local={"max_entries": 10})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="local_ttl"):
        Policy(ttl=1.0, local_ttl=-1.0)


async def run(node: redis.Redis, *command: object) -> Any:
    return await node.execute_command(*command)  # type: ignore[no-untyped-call]


@pytest.mark.slow
async def test_a_slot_moved_to_a_new_cluster_primary_is_tracked(namespace: str) -> None:
    # A resharding onto a node the L1 did not track: its writes would go unannounced. The
    # topology check (CLUSTER SLOTS) finds the new primary, drops what the L1 held, tracks it.
    with RedisClusterServer(masters=2) as cluster:
        new = RedisServer(
            port=_free_port_pair(),
            extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
        )
        with new:
            nodes = [redis.Redis(port=n.port) for n in [*cluster.nodes, new]]
            ids = [(await run(n, "CLUSTER MYID")).decode() for n in nodes]
            await run(nodes[-1], "CLUSTER MEET", "127.0.0.1", cluster.nodes[0].port)

            async def everyone_knows_the_new_node() -> None:
                async with asyncio.timeout(20):
                    for n in nodes:
                        while True:
                            known = str(await run(n, "CLUSTER NODES"))
                            info = await run(n, "CLUSTER INFO")
                            if all(i in known for i in ids) and info["cluster_state"] == "ok":
                                break
                            await asyncio.sleep(0.05)

            await everyone_knows_the_new_node()
            startup = [ClusterNode(h, p) for h, p in cluster.startup_nodes]
            reader_client = RedisCluster(startup_nodes=startup)
            writer_client = RedisCluster(startup_nodes=startup)
            reader = l1_cache(reader_client, namespace, local=LocalCache(ttl=600.0))
            assert reader._near is not None
            reader._near.topology_interval = 0.2
            writer = Cache(writer_client, namespace=namespace, policy=Policy(ttl=30.0))
            try:
                async with reader, writer:
                    assert len(reader._near.listeners) == 2
                    rkey = reader.keys.value("k")
                    await writer.set("k", "v1")
                    await held(reader, "k", "v1")
                    # Move the key's slot (and the key) from its owner to the new node.
                    slot = reader_client.keyslot(rkey)
                    home = reader_client.get_node_from_key(rkey.decode())
                    assert home is not None
                    source = next(i for i, n in enumerate(cluster.nodes) if n.port == home.port)
                    await run(nodes[-1], "CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
                    await run(nodes[source], "CLUSTER SETSLOT", slot, "MIGRATING", ids[-1])
                    await run(
                        nodes[source], "MIGRATE", "127.0.0.1", new.port, "", 0, 5000, "KEYS", rkey
                    )
                    for n in nodes:
                        await run(n, "CLUSTER SETSLOT", slot, "NODE", ids[-1])
                    await held(reader, "k", "v1")  # read again, now from the new node
                    await wait_until(lambda: len(reader._near.listeners) == 3, within=10)  # type: ignore[union-attr]
                    await wait_until(lambda: reader._near.serving, within=10)  # type: ignore[union-attr]
                    await writer.set("k", "v2")  # on the new primary
                    async with asyncio.timeout(5):
                        while await reader.get("k") != "v2":
                            await asyncio.sleep(0.002)
            finally:
                await reader_client.aclose()
                await writer_client.aclose()
                for n in nodes:
                    await n.aclose()


async def test_clear_drops_what_the_l1_held_at_once(near: Cache) -> None:
    await near.set("user:1", 1)
    await near.set("other", 2)
    await held(near, "user:1", 1)
    assert await near.clear("user:*") == 1
    assert await near.get("user:1", default="gone") == "gone"
    assert await near.get("other") == 2


async def test_a_write_through_one_cache_is_not_read_stale_from_another_of_the_process(
    client: redis.Redis, redis_server: RedisServer, namespace: str
) -> None:
    """Two Caches, two clients, one namespace: the second's L1 served the replaced value
    177 times in 200 right after the first's set() returned (issue 22)."""
    other = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        async with l1_cache(client, namespace) as writer, l1_cache(other, namespace) as reader:
            await writer.set("k", 0)
            stale = []
            for i in range(1, 201):
                await held(reader, "k", i - 1)  # the reader's L1 serves the value to replace
                await writer.set("k", i)
                got = await reader.get("k")
                if got != i:
                    stale.append((i, got))
            assert stale == []
            await held(reader, "k", 200)
            assert await writer.delete("k")
            assert await reader.get("k", default="gone") == "gone"
            await writer.set("user:1", 1)
            await held(reader, "user:1", 1)
            assert await writer.clear("user:*") == 1
            assert await reader.get("user:1", default="gone") == "gone"
    finally:
        await other.aclose()


async def test_a_closed_cache_leaves_the_registry_of_l1s(
    client: redis.Redis, namespace: str
) -> None:
    from aiocacheguard import near as near_module

    prefix = b"{" + namespace.encode() + b":"
    async with l1_cache(client, namespace) as first:
        second = l1_cache(client, namespace)
        assert len(near_module._OPEN[prefix]) == 2
        await second.aclose()
        assert [ref() for ref in near_module._OPEN[prefix]] == [first._near]
        del second
        await first.set("k", 1)  # (a write tells the open one only)
    assert prefix not in near_module._OPEN


async def test_a_resp3_client_gets_a_resp2_listener_and_its_invalidations(
    redis_server: RedisServer, namespace: str
) -> None:
    # redis-py 8 speaks RESP3 by default; redirected to a RESP3 connection the invalidations
    # would be push frames its pub/sub drops. The Cache's listener speaks RESP2 regardless.
    client = redis.Redis(port=redis_server.port, protocol=3)
    outsider = redis.Redis(port=redis_server.port, protocol=3)
    try:
        async with l1_cache(client, namespace, local=LocalCache(ttl=600.0)) as cache:
            await cache.set("k", "old")
            await held(cache, "k", "old")
            await outsider.set(cache.keys.value("k"), await _record_of(cache, "new"))
            async with asyncio.timeout(5):
                while await cache.get("k") != "new":
                    await asyncio.sleep(0.001)
    finally:
        await client.aclose()
        await outsider.aclose()


async def test_aclose_returns_after_the_loop_was_blocked_past_the_health_interval(
    client: redis.Redis, namespace: str
) -> None:
    # The listener's read times out and it PINGs as aclose() cancels it: redis-py sends under
    # asyncio.wait_for, which loses that cancellation on Python 3.11. aclose() must not hang.
    cache = l1_cache(client, namespace)
    async with asyncio.timeout(10):
        async with cache:
            await cache.set("k", 1)
            time.sleep(1.3)  # noqa: ASYNC251 - the loop blocked (CPU-bound work, a GC pause)
    assert not library_tasks()


async def test_copy_on_read_hands_each_caller_its_own_object(
    client: redis.Redis, namespace: str
) -> None:
    async with l1_cache(client, namespace, local=LocalCache(copy_on_read=True)) as cache:
        await cache.set("k", {"items": [1]})
        await held(cache, "k", {"items": [1]})
        first = await cache.get("k")
        first["items"].append(2)  # the caller mutates what it got
        assert await cache.get("k") == {"items": [1]}

        async def never() -> dict[str, list[int]]:
            raise AssertionError("a hit")

        again = await cache.get_or_load("k", never)
        assert again == {"items": [1]} and again is not first
        assert cache.statistics().local_hits >= 3


async def test_local_ttl_zero_is_never_served_from_the_l1(near: Cache, client: redis.Redis) -> None:
    await near.set("k", 1)
    await held(near, "k", 1)  # another policy's reads filled the L1

    async def never() -> int:
        raise AssertionError("a hit")

    before, hits = await reads(client), near.statistics().local_hits
    assert await near.get_or_load("k", never, policy=Policy(ttl=30.0, local_ttl=0)) == 1
    assert await reads(client) == before + 1 and near.statistics().local_hits == hits


async def test_a_read_begun_before_a_write_is_not_joined_after_its_invalidation(
    redis_server: RedisServer, namespace: str
) -> None:
    # A large reply trickles through the proxy (per-connection bandwidth) while another client
    # writes; the invalidation overtakes it. Callers arriving after the invalidation must not
    # join the old read: they read again.
    old, new = "o" * 200_000, "n" * 200_000
    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port)
        writer_client = redis.Redis(port=redis_server.port)
        try:
            async with (
                l1_cache(client, namespace, command_timeout=10.0) as reader,
                Cache(writer_client, namespace=namespace, policy=Policy(ttl=60.0)) as writer,
            ):
                assert reader._local is not None
                await writer.set("k", old)
                proxy.downstream_bandwidth = 200_000  # bytes/s: the reply takes about 1 s
                sent = proxy.statistics().bytes_downstream
                first = asyncio.create_task(reader.get("k"))
                await wait_until(lambda: proxy.statistics().bytes_downstream > sent + 1000)
                invalidations = reader._local.invalidations
                await writer.set("k", new)
                await wait_until(lambda: reader._local.invalidations > invalidations)  # type: ignore[union-attr]

                async def never() -> str:
                    raise AssertionError("the key is present")

                second = asyncio.create_task(reader.get("k"))
                third = asyncio.create_task(reader.get_or_load("k", never))
                assert await first == old  # began before the write
                assert await second == new and await third == new
                proxy.downstream_bandwidth = None
        finally:
            await client.aclose()
            await writer_client.aclose()


def test_max_bytes_bounds_the_memory_of_100_000_small_entries() -> None:
    # Real memory (tracemalloc), not the accounting: entries as the Cache holds them (a record
    # with its payload, decoded once by a hit), small JSON values.
    import random
    import tracemalloc

    from aiocacheguard.codec import RecordCodec
    from aiocacheguard.near import NearCache
    from aiocacheguard.serializers import MsgspecJsonSerializer

    max_bytes = 8 * 1024 * 1024
    codec = RecordCodec(MsgspecJsonSerializer(), clock=time.time, rng=random.Random(1))
    near = NearCache(
        LocalCache(max_entries=1_000_000, max_bytes=max_bytes),
        redis.Redis(),  # never connected: only its settings would be used
        b"{ns:",
        clock=time.time,
        budget=1.0,
    )
    near.store.resume()  # serving, as once the listener listens
    values = [{"id": i, "name": f"user {i}", "tags": ["a", "b"]} for i in range(100_000)]
    policy = Policy(ttl=600.0)
    records = [codec.encode(v, policy, compute_time=0.0, rkey=b"") for v in values]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, encoded in enumerate(records):
            assert encoded is not None
            rkey = b"{ns:user:%d}" % i
            token = near.begin(rkey)
            entry = codec.decode(encoded[0], rkey)
            assert entry is not None
            near.fill(rkey, token, entry, len(encoded[0]), None)
            held_entry = near.store.get(rkey)
            if held_entry is not None:
                held_entry.result()  # decoded by a hit, as the L1 holds it
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert near.store.bytes <= max_bytes
    assert used <= max_bytes, f"{used:,} bytes for max_bytes={max_bytes:,}"
    assert len(near.store) > 1_000  # and it did keep entries
