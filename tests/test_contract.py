"""
One contract, every deployment: the same behaviour on a standalone Redis, on one that speaks
TLS only, on a Redis Cluster (3 primaries) and through Sentinel (primary, replica, sentinel),
as dogpile.cache runs one suite on every backend; and once more on a standalone Redis as the
least-privileged user of ``aiocacheguard acl --namespace NS --local --bloom`` (created on the
session's server from the generated line), so the permission list is proven against what the
code sends.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

from aiocacheguard import BloomFilter, Cache, LocalCache, Policy, cached, ops
from aiocacheguard.testing import RedisClusterServer, RedisSentinelServer, RedisServer

from .helpers import GatedLoader, wait_until

Client = redis.Redis | RedisCluster


#: The admin client behind a least-privileged deployment, for what a test does as an operator.
ADMINS: dict[int, Client] = {}


def admin_of(client: Client) -> Client:
    return ADMINS.get(id(client), client)


@pytest.fixture(params=["standalone", "tls", "cluster", "sentinel", "least-privilege"])
async def deployment(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Client]:
    if request.param == "least-privilege":
        server: RedisServer = request.getfixturevalue("redis_server")
        admin = redis.Redis(port=server.port)
        user = ops.acl(namespace, user=f"least-{namespace}", password="pw", local=True, bloom=True)
        try:
            await admin.execute_command(*user.arguments)  # type: ignore[no-untyped-call]
        except BaseException:
            await admin.aclose()  # else its connection is reported unclosed by a later test
            raise
        client: Client = redis.Redis(port=server.port, username=user.user, password="pw")
        ADMINS[id(client)] = admin
        try:
            yield client
            # Nothing the test did was refused to the user (Redis logs every refusal, of a
            # script's commands too): the list is all the code needs. (The start check's ACL
            # DRYRUN is refused, once per Cache: the user is not allowed to ask. So is redis-py's
            # CLIENT SETINFO on Redis 7.2+ and Valkey, which it sends on every connection and
            # whose refusal it ignores: the library never needs it.)
            log = await admin.acl_log()
            refused = [e for e in log if e.get("username") == user.user]
            outside = {"acl|dryrun", "client|setinfo"}
            if int(str((await admin.info("server"))["redis_version"]).split(".")[0]) < 7:
                # Redis 6.2's ACL LOG names a command without its subcommand: `acl` is the
                # start check's DRYRUN (which 6.2 lacks), `client` redis-py's SETINFO. The
                # L1's CLIENT TRACKING, also `client` there, is checked on Redis 7.
                outside |= {"acl", "client"}
            assert [e for e in refused if e.get("object") not in outside] == []
        finally:
            del ADMINS[id(client)]
            await client.aclose()
            await admin.acl_deluser(user.user)
            await admin.aclose()
        return
    if request.param in ("standalone", "tls"):
        fixture = "redis_server" if request.param == "standalone" else "redis_tls_server"
        server = request.getfixturevalue(fixture)
        client = redis.Redis(port=server.port, **server.tls_options)
    elif request.param == "sentinel":
        deployment: RedisSentinelServer = request.getfixturevalue("redis_sentinel")
        sentinel = Sentinel(deployment.sentinels, socket_timeout=1.0)
        client = sentinel.master_for(deployment.service, socket_timeout=1.0)
        yield client
        await client.aclose()
        for sentinel_client in sentinel.sentinels:
            await sentinel_client.aclose()
        return
    else:
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
        await client.initialize()
    yield client
    await client.aclose()


def make(client: Client, namespace: str, **policy: Any) -> Cache:
    return Cache(client, namespace=namespace, policy=Policy(ttl=30.0, **policy))


async def test_get_set_delete(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as cache:
        await cache.set("k", {"a": 1})
        assert await cache.get("k") == {"a": 1}
        assert await cache.delete("k") is True
        assert await cache.get("k", default="gone") == "gone"


async def test_one_load_for_concurrent_misses(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as cache:
        loader = GatedLoader("v")
        tasks = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(1000)]
        await loader.started.wait()
        loader.release.set()
        assert await asyncio.gather(*tasks) == ["v"] * 1000
        assert loader.calls == 1


async def test_distinct_keys_across_slots(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as cache:

        async def load(i: int) -> int:
            return i

        keys = range(1000)
        got = await asyncio.gather(
            *(cache.get_or_load(f"k{i}", functools.partial(load, i)) for i in keys)
        )
        assert got == list(keys)
        read = await asyncio.gather(*(cache.get(f"k{i}") for i in keys))
        assert read == list(keys), (read.count(None), cache.statistics())
        assert cache.statistics().redis_errors == 0


async def test_waiter_in_another_cache_is_notified(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as a, make(deployment, namespace) as b:
        loader = GatedLoader("filled")
        holder = asyncio.create_task(a.get_or_load("k", loader))
        await loader.started.wait()
        waiter = asyncio.create_task(b.get_or_load("k", loader))
        await wait_until(lambda: b.statistics().lock_waits > 0)
        loader.release.set()
        assert await asyncio.wait_for(waiter, 5) == "filled"
        assert await holder == "filled" and loader.calls == 1


async def test_a_load_longer_than_the_lease_keeps_its_lock(
    deployment: Client, namespace: str
) -> None:
    """The lease is renewed while the loader runs (PEXPIRE), so nobody takes the lock over."""
    async with make(deployment, namespace, lock_ttl=0.3) as a, make(deployment, namespace) as b:
        calls = 0

        async def slow() -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(1.0)  # the load itself: three leases long
            return "loaded"

        holder = asyncio.create_task(a.get_or_load("k", slow))
        await wait_until(lambda: a.statistics().lock_acquired == 1)
        assert await b.get_or_load("k", slow) == "loaded"
        assert await holder == "loaded"
        assert calls == 1 and b.statistics().takeovers == 0


async def test_set_supersedes_a_rebuild(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as cache:
        loader = GatedLoader("old")
        holder = asyncio.create_task(cache.get_or_load("k", loader))
        await loader.started.wait()
        await cache.set("k", "new")
        loader.release.set()
        await holder
        assert await cache.get("k") == "new"
        assert cache.statistics().lock_lost == 1


async def test_soft_expiry_refreshes_in_the_background(deployment: Client, namespace: str) -> None:
    now = [time.time()]
    policy = Policy(ttl=100.0, soft_ttl=10.0, jitter=0.0)
    async with Cache(deployment, namespace=namespace, policy=policy, clock=lambda: now[0]) as c:
        seed = GatedLoader("old")
        seed.release.set()
        await c.get_or_load("k", seed)
        now[0] += 20
        fresh = GatedLoader("new")
        fresh.release.set()
        assert await c.get_or_load("k", fresh) == "old"
        await wait_until(lambda: c.statistics().refreshes == 1)
        assert await c.get_or_load("k", fresh) == "new"


async def test_bloom_filter(deployment: Client, namespace: str) -> None:
    bloom = BloomFilter("ids", capacity=1000, error_rate=0.01)
    async with Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0), bloom=bloom) as c:
        await bloom.add_many([f"id{i}" for i in range(100)])
        assert all(await bloom.contains_many([f"id{i}" for i in range(100)]))
        loader = GatedLoader("v")
        loader.release.set()
        assert await c.get_or_load("id5", loader) == "v"
        assert await c.get_or_load("never-added", loader) is None
        assert loader.calls == 1
        await bloom.rebuild([f"id{i}" for i in range(50)])
        assert await bloom.contains("id1") is True


async def test_scripts_reload_after_flush(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as cache:
        loader = GatedLoader("v")
        loader.release.set()
        await cache.get_or_load("a", loader)
        if isinstance(deployment, RedisCluster):
            for node in deployment.get_primaries():
                await deployment.execute_command("SCRIPT", "FLUSH", target_nodes=node)
        else:
            await admin_of(deployment).script_flush()
        await cache.get_or_load("b", loader)
        assert loader.calls == 2 and cache.statistics().redis_errors == 0


async def test_decorator(deployment: Client, namespace: str) -> None:
    async with make(deployment, namespace) as cache:
        calls = 0

        @cached(cache, key="user:{user_id}")
        async def get_user(user_id: int) -> dict[str, int]:
            nonlocal calls
            calls += 1
            return {"id": user_id}

        assert await asyncio.gather(*(get_user(i % 10) for i in range(100))) == [
            {"id": i % 10} for i in range(100)
        ]
        assert calls == 10
        assert await get_user.invalidate(3) is True


async def test_l1_is_invalidated_by_every_writer(deployment: Client, namespace: str) -> None:
    # One listener per primary on a cluster: keys on every node reach the reader's L1 (whose
    # own ttl is longer than the test: only invalidations can end what it serves).
    local = LocalCache(ttl=600.0)
    async with (
        Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0), local=local) as writer,
        Cache(deployment, namespace=namespace, policy=Policy(ttl=30.0), local=local) as reader,
    ):
        assert reader._near is not None and reader._near.serving
        primaries = len(deployment.get_primaries()) if isinstance(deployment, RedisCluster) else 1
        assert len(reader._near.listeners) == primaries
        keys = [f"k{i}" for i in range(30)]

        async def served_locally(expected: dict[str, object]) -> None:
            async with asyncio.timeout(5):
                for key, value in expected.items():
                    while True:
                        hits = reader.statistics().local_hits
                        if await reader.get(key, "gone") == value and (
                            reader.statistics().local_hits > hits
                        ):
                            break
                        await asyncio.sleep(0.002)

        await writer.set_many(dict.fromkeys(keys, 1))
        await served_locally(dict.fromkeys(keys, 1))
        await writer.set_many(dict.fromkeys(keys, 2))  # another Cache's writes...
        await deployment.delete(reader.keys.value("k0"))  # ...and a plain client's DEL
        async with asyncio.timeout(5):
            while [await reader.get(k, "gone") for k in keys] != ["gone"] + [2] * 29:
                await asyncio.sleep(0.002)
        assert reader.statistics().invalidations >= 30


@pytest.mark.slow
async def test_sentinel_failover_keeps_callers_served(namespace: str) -> None:
    """Stop the primary: callers are served throughout, and writes resume on the promoted one."""
    with RedisSentinelServer() as deployment:
        sentinel = Sentinel(deployment.sentinels, socket_timeout=0.5)
        client = sentinel.master_for(deployment.service, socket_timeout=0.5)
        calls = 0

        async def load() -> str:
            nonlocal calls
            calls += 1
            return f"load {calls}"

        async with make(client, namespace) as cache:
            assert await cache.get_or_load("k", load) == "load 1"
            old_primary = deployment.primary
            assert old_primary is not None
            old_primary.stop()  # the primary dies
            served: list[str] = []
            deadline = time.monotonic() + 30
            while True:  # every call is answered, from Redis or from the loader
                served.append(await cache.get_or_load(f"during-{len(served)}", load))
                try:
                    address = await sentinel.discover_master(deployment.service)
                except MasterNotFoundError:  # down, not yet replaced
                    address = ("", old_primary.port)
                if address[1] != old_primary.port:
                    break
                assert time.monotonic() < deadline, "no failover within 30 s"
                await asyncio.sleep(0.1)
            assert all(value.startswith("load ") for value in served)
            # After the failover the cache writes and reads through the new primary.
            for _ in range(50):
                try:
                    await cache.set("after", "written")
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            assert await cache.get("after") == "written"
            assert await cache.get_or_load("after", load) == "written"
        await client.aclose()
        for sentinel_client in sentinel.sentinels:
            await sentinel_client.aclose()
