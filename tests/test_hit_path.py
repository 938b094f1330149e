"""
The lone hit's own GET (`RedisBackend._get_lone`): on a connection of the client's pool,
without ``execute_command``, yet with what the client does for a command kept. Under the
default ``max_value_bytes`` the GET is ``GETRANGE key 0 limit`` (a value past the limit stays
in Redis), so that is the command counted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocacheguard import BackendTimeout, BackendUnavailable, Cache, Policy
from aiocacheguard.backend import _bounds, _pack_getrange, _packed_tail
from aiocacheguard.testing import FaultProxy, RedisServer

from .helpers import wait_until

VALUE = {"id": 7, "name": "seven"}


@contextlib.asynccontextmanager
async def proxied(
    redis_server: RedisServer, retries: int | None = None, **options: Any
) -> AsyncIterator[tuple[FaultProxy, aioredis.Redis]]:
    """A client through a FaultProxy: redis-py's default retries, or ``retries`` of them."""
    if retries is not None:
        options["retry"] = Retry(NoBackoff(), retries)
    async with FaultProxy(redis_server.port) as proxy:
        client = aioredis.Redis(port=proxy.port, **options)
        try:
            yield proxy, client
        finally:
            await proxy.heal()
            await client.aclose()


async def test_a_reply_cut_mid_hit_is_retried_as_the_clients_retry_policy_says(
    redis_server: RedisServer, namespace: str
) -> None:
    # redis-py's default client retries a command whose connection failed; the lean GET
    # must too (through the client), or a dropped connection becomes an error for the caller.
    async with (
        proxied(redis_server) as (proxy, client),  # redis-py's default retries
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache,
    ):
        await cache.set("k", VALUE)
        accepted = proxy.statistics().connections_accepted
        for _ in range(3):
            proxy.truncate_next_reply(5)  # the GET's reply is cut, its connection closed
            assert await cache.get("k") == VALUE
        assert proxy.statistics().connections_accepted - accepted == 3  # 3 cut, 3 redone
        assert cache.statistics().redis_errors == 0


async def test_a_reply_cut_mid_hit_fails_when_the_client_does_not_retry(
    redis_server: RedisServer, namespace: str
) -> None:
    async with (
        proxied(redis_server, retries=0) as (proxy, client),
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0), breaker=None) as cache,
    ):
        await cache.set("k", VALUE)
        proxy.truncate_next_reply(5)
        with pytest.raises(BackendUnavailable):
            await cache.get("k")
        assert cache.statistics().redis_errors == 1
        assert await cache.get("k") == VALUE  # the next one, on a new connection


class CountingRedis(aioredis.Redis):
    """A client subclass that does something around each command (as instrumentation does)."""

    commands: list[Any]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(args[0])
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


async def test_a_client_subclass_runs_every_hit_through_its_execute_command(
    redis_server: RedisServer, namespace: str
) -> None:
    client = CountingRedis(port=redis_server.port)
    client.commands = []
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            await cache.set("k", VALUE)
            before = client.commands.count("GETRANGE")
            for _ in range(5):
                assert await cache.get("k") == VALUE
            assert client.commands.count("GETRANGE") - before == 5
    finally:
        await client.aclose()


async def test_a_single_connection_client_keeps_to_its_one_connection(
    redis_server: RedisServer, namespace: str
) -> None:
    async with (
        proxied(redis_server, single_connection_client=True) as (proxy, client),
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache,
    ):
        await cache.set("k", VALUE)
        for _ in range(5):
            assert await cache.get("k") == VALUE
        assert proxy.statistics().connections_accepted == 1


async def test_execute_command_instrumented_after_the_cache_was_made_sees_every_hit(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What OpenTelemetry's redis instrumentation does: replace the class's execute_command.
    seen: list[Any] = []
    original = aioredis.Redis.execute_command

    async def traced(self: aioredis.Redis, *args: Any, **options: Any) -> Any:
        seen.append(args[0])
        return await original(self, *args, **options)  # type: ignore[no-untyped-call]

    client = aioredis.Redis(port=redis_server.port)
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            await cache.set("k", VALUE)
            monkeypatch.setattr(aioredis.Redis, "execute_command", traced)
            for _ in range(5):
                assert await cache.get("k") == VALUE
            assert seen.count("GETRANGE") == 5
    finally:
        await client.aclose()


async def test_execute_command_patched_on_the_client_sees_every_hit(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mock.patch.object(client, "execute_command", ...), as tests of applications do.
    client = aioredis.Redis(port=redis_server.port, retry=Retry(NoBackoff(), 0))
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            await cache.set("k", VALUE)

            async def down(*args: Any, **options: Any) -> Any:
                raise redis.ConnectionError("patched: Redis is down")

            monkeypatch.setattr(client, "execute_command", down)
            with pytest.raises(BackendUnavailable):
                await cache.get("k")
    finally:
        await client.aclose()


_SEEN_IN_A_FRESH_PROCESS = """
import asyncio, sys
import redis.asyncio as aioredis
import redis.asyncio.client as client_module
seen = []
if sys.argv[2] == "instrumented-before-import":
    # As Sentry's redis integration does: a plain function put on the class.
    original = aioredis.Redis.execute_command
    async def traced(self, *args, **options):
        seen.append(args[0])
        return await original(self, *args, **options)
    aioredis.Redis.execute_command = traced
else:
    # redis-py's own metrics, turned on after the Cache is made: every command through
    # execute_command reports its duration.
    recorded = client_module.record_operation_duration
    async def spy(command_name, *args, **kwargs):
        seen.append(command_name)
        return await recorded(command_name, *args, **kwargs)
    client_module.record_operation_duration = spy
from aiocacheguard import Cache, Policy

async def main():
    client = aioredis.Redis(port=int(sys.argv[1]))
    async with Cache(client, namespace="lean-" + sys.argv[2], policy=Policy(ttl=30.0)) as cache:
        await cache.set("k", 1)
        if sys.argv[2] == "metrics-on-after-the-cache":
            from redis.observability.config import OTelConfig
            from redis.observability.providers import get_observability_instance
            get_observability_instance().init(OTelConfig())
        before = seen.count("GETRANGE")
        for _ in range(5):
            assert await cache.get("k") == 1
        print(seen.count("GETRANGE") - before)
    await client.aclose()

asyncio.run(main())
"""


@pytest.mark.parametrize("scenario", ["instrumented-before-import", "metrics-on-after-the-cache"])
def test_what_redis_py_reports_of_commands_sees_every_hit(
    redis_server: RedisServer, scenario: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SEEN_IN_A_FRESH_PROCESS, str(redis_server.port), scenario],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "5"


@pytest.mark.parametrize("retries", [0, 1, 2])
async def test_a_failing_hit_is_tried_as_often_as_the_client_retry_policy_says(
    redis_server: RedisServer, namespace: str, retries: int
) -> None:
    async with (
        proxied(redis_server, retries=retries) as (proxy, client),
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0), breaker=None) as cache,
    ):
        await cache.set("k", VALUE)
        gets: list[bytes] = []

        async def cut_every_get() -> None:  # step mode: each read's reply is cut short
            while True:
                (chunk,) = (await proxy.wait_held(1, timeout=30.0))[:1]
                if chunk.data.startswith(b"*4\r\n$8\r\nGETRANGE"):  # (the bounded GET)
                    gets.append(chunk.data)
                    proxy.truncate_next_reply(2)
                proxy.release(1)

        proxy.hold()
        cutter = asyncio.create_task(cut_every_get())
        try:
            with pytest.raises(BackendUnavailable):
                await cache.get("k")
        finally:
            cutter.cancel()
            await proxy.heal()
        assert len(gets) == 1 + retries


async def test_aclose_leaves_a_lone_read_in_flight_its_budget(
    redis_server: RedisServer, namespace: str
) -> None:
    async with FaultProxy(redis_server.port) as proxy:
        client = aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        cache = Cache(
            client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=0.3,
            breaker=None,
        )  # fmt: skip
        try:
            await cache.set("k", 1)
            proxy.blackhole()
            reading = asyncio.create_task(cache.get("k"))
            await wait_until(lambda: proxy.statistics().bytes_swallowed > 0)  # GET on the wire
            await cache.aclose()
            done, _ = await asyncio.wait({reading}, timeout=2.0)  # (redis-py gives up at 5 s)
            assert done, "the read lost its budget when the Cache closed"
            with pytest.raises(BackendTimeout):
                reading.result()
        finally:
            await proxy.heal()
            await client.aclose()


def test_a_cache_used_from_a_second_event_loop_keeps_its_budget(namespace: str) -> None:
    # A Cache belongs to one loop, but a second one must not lose every budget silently.
    with RedisServer() as server:
        client = aioredis.Redis(port=server.port, retry=Retry(NoBackoff(), 0))
        cache = Cache(
            client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=0.3,
            breaker=None,
        )  # fmt: skip

        async def first() -> None:
            await cache.set("k", 1)
            assert await cache.get("k") == 1
            await client.connection_pool.disconnect()

        async def second() -> float:
            assert await cache.get("k") == 1
            redis.Redis(port=server.port).execute_command("CLIENT", "PAUSE", 2000, "ALL")  # type: ignore[no-untyped-call]
            started = time.monotonic()
            with pytest.raises(BackendTimeout):
                await cache.get("k")
            took = time.monotonic() - started
            await cache.aclose()
            await client.aclose()
            return took

        asyncio.run(first())
        assert asyncio.run(second()) < 1.5


@contextlib.asynccontextmanager
async def pooled(
    port: int, **options: Any
) -> AsyncIterator[tuple[aioredis.BlockingConnectionPool, aioredis.Redis]]:
    """A client on a BlockingConnectionPool (``options``) of its own; both closed at the end."""
    pool = aioredis.BlockingConnectionPool(port=port, **options)
    client = aioredis.Redis(connection_pool=pool)
    try:
        yield pool, client
    finally:
        await client.aclose()
        await pool.aclose()  # a pool given to the client is not closed by it


async def every_connection_free(pool: aioredis.BlockingConnectionPool) -> None:
    """All of the pool's connections can be taken at once (it times out on one still lent)."""
    taken = [await pool.get_connection() for _ in range(pool.max_connections)]  # type: ignore[no-untyped-call]
    for connection in taken:
        await pool.release(connection)


async def test_the_lone_gets_connection_goes_back_to_the_pool_when_the_cache_closes(
    redis_server: RedisServer, namespace: str
) -> None:
    async with pooled(redis_server.port, max_connections=10, timeout=0.5) as (pool, client):
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            await cache.set("k", VALUE)
            for _ in range(20):
                assert await cache.get("k") == VALUE
        await every_connection_free(pool)


async def test_a_pool_too_small_to_keep_a_connection_still_serves_batches_beside_lone_gets(
    redis_server: RedisServer, namespace: str
) -> None:
    # One connection in all: a lone GET must give it back for the batch waiting behind it.
    async with (
        pooled(redis_server.port, max_connections=1, timeout=5) as (_, client),
        Cache(client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=2.0) as cache,
    ):
        keys = [f"k{i}" for i in range(20)]
        for key in keys:
            await cache.set(key, key)
        assert await cache.get("k0") == "k0"  # a lone GET first
        assert await asyncio.gather(*(cache.get(key) for key in keys)) == keys


async def test_aclose_during_a_lone_read_leaves_no_connection_out_of_the_pool(
    redis_server: RedisServer, namespace: str
) -> None:
    async with (
        FaultProxy(redis_server.port) as proxy,
        pooled(proxy.port, max_connections=10, timeout=0.5, retry=Retry(NoBackoff(), 0)) as (
            pool,
            client,
        ),
    ):
        cache = Cache(
            client, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=0.3,
            breaker=None,
        )  # fmt: skip
        try:
            await cache.set("k", 1)
            assert await cache.get("k") == 1  # a lone GET, on a borrowed connection
            proxy.blackhole()
            reading = asyncio.create_task(cache.get("k"))
            await wait_until(lambda: proxy.statistics().bytes_swallowed > 0)
            await cache.aclose()
            with pytest.raises(BackendTimeout):
                await reading
            await proxy.heal()
            await every_connection_free(pool)
        finally:
            await proxy.heal()


@pytest.mark.parametrize("key", [b"k", b"{ns:123456789}", b"\r\n$4\r\nbin\x00" * 20])
@pytest.mark.parametrize("limit", [1, 16 * 1024 * 1024])
def test_the_lone_read_is_packed_as_redis_py_packs_it(key: bytes, limit: int) -> None:
    # The bounded lone read packs its GETRANGE itself (a tenth of redis-py's time): byte for
    # byte what redis-py's packer makes of the same command.
    tail = _packed_tail(_bounds(limit))
    assert tail is not None
    packer = aioredis.Connection()
    assert _pack_getrange(key, tail) == b"".join(packer.pack_command("GETRANGE", key, 0, limit))
