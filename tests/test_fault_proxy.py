"""FaultProxy against a real redis-server: each fault does what it says, and nothing more."""

from __future__ import annotations

import asyncio
import errno
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from aiocacheguard.errors import ConfigurationError
from aiocacheguard.testing import FaultProxy, RedisServer

BIG = 2_000_000  # bytes of the large value the bandwidth tests move


def connect(proxy: FaultProxy) -> redis.Redis:
    """A client through the proxy that never retries: each fault shows as the error it is."""
    return redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0), socket_timeout=5.0)


async def get(client: redis.Redis, key: str) -> bytes | str | None:
    """A coroutine for create_task (redis-py types its commands as plain Awaitables)."""
    return await client.get(key)


def other_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a counter that has no event of its own (bytes forwarded so far)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.001)


@pytest.fixture
def key() -> str:
    return f"fault-proxy-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def direct(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A client straight to the server, to set up data without going through faults."""
    async with redis.Redis(port=redis_server.port) as client:
        yield client


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    before = other_tasks()
    async with FaultProxy(redis_server.port) as proxy:
        yield proxy
    assert other_tasks() <= before, "aclose() left tasks behind"


async def test_forwards_and_counts(proxy: FaultProxy, key: str) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}"
    async with connect(proxy) as client:
        await client.set(key, "v")
        assert await client.get(key) == b"v"
        stats = proxy.statistics()
        assert (stats.connections_accepted, stats.connections_open) == (1, 1)
        assert stats.bytes_upstream > len(key) * 2
        assert stats.bytes_downstream > 0


async def test_latency_delays_each_way_and_keeps_replies_matched(
    proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    await direct.mset({f"{key}:{i}": str(i) for i in range(20)})
    async with connect(proxy) as client:
        await client.ping()
        proxy.upstream_latency = 0.05
        proxy.downstream_latency = 0.03
        started = time.perf_counter()
        assert await client.get(f"{key}:0") == b"0"
        assert time.perf_counter() - started >= 0.08
        # Pipelined on one connection, and concurrent over several: every reply is its own.
        pipe = client.pipeline(transaction=False)
        for i in range(20):
            pipe.get(f"{key}:{i}")
        assert await pipe.execute() == [str(i).encode() for i in range(20)]
        replies = await asyncio.gather(*(client.get(f"{key}:{i}") for i in range(20)))
        assert replies == [str(i).encode() for i in range(20)]


async def test_bandwidth_slows_a_large_reply_not_a_small_one(
    proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    await direct.set(key, b"x" * BIG)
    await direct.set(f"{key}:small", b"s")
    rate = 4_000_000
    async with connect(proxy) as large, connect(proxy) as small:
        await large.ping()
        await small.ping()
        proxy.downstream_bandwidth = rate
        started = time.perf_counter()
        big = asyncio.create_task(get(large, key))
        # A small reply on another connection is not queued behind the large one.
        assert await small.get(f"{key}:small") == b"s"
        assert time.perf_counter() - started < 0.2
        assert not big.done()
        assert len(await big or b"") == BIG
        assert time.perf_counter() - started >= 0.95 * BIG / rate
        # The cap applies the other way too.
        proxy.downstream_bandwidth = None
        proxy.upstream_bandwidth = rate
        started = time.perf_counter()
        await large.set(key, b"y" * (BIG // 2))
        assert time.perf_counter() - started >= 0.95 * BIG / 2 / rate


async def _connection_of(proxy: FaultProxy, client: redis.Redis, direct: redis.Redis) -> int:
    """The proxy's id of ``client``'s one connection, found by the port Redis sees."""
    own = int(await client.client_id())
    (info,) = [c for c in await direct.client_list() if int(c["id"]) == own]
    port = int(info["addr"].rsplit(":", 1)[1])
    (connection,) = [c for c, p in proxy.connections.items() if p == port]
    return connection


async def test_one_connection_blackholed_while_the_others_carry_on(
    proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    async with connect(proxy) as frozen, connect(proxy) as other:
        await direct.set(key, "v")
        assert await frozen.get(key) == await other.get(key) == b"v"
        proxy.blackhole(connection=await _connection_of(proxy, frozen, direct))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await frozen.get(key)
        assert await other.get(key) == b"v"
        async with connect(proxy) as fresh:  # new connections are not blackholed
            assert await fresh.get(key) == b"v"
        with pytest.raises(ValueError, match="no open connection"):
            proxy.blackhole(connection=999)
        await proxy.heal()  # the frozen one lost bytes: closed, and replaced on next use
        assert await frozen.get(key) == b"v"


async def test_inject_sends_bytes_to_one_client_as_if_from_the_server(
    proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    async with connect(proxy) as client, connect(proxy) as other:
        await direct.set(key, "v")
        assert await client.get(key) == await other.get(key) == b"v"
        proxy.inject(b"+injected\r\n", connection=await _connection_of(proxy, client, direct))
        # The next reply read on that connection is the injected one, a frame out of step.
        assert await client.get(key) == b"injected"
        assert await other.get(key) == b"v"


async def test_blackhole_times_out_until_heal(proxy: FaultProxy, key: str) -> None:
    async with connect(proxy) as client, connect(proxy) as idle:
        await client.set(key, "v")
        assert await idle.get(key) == b"v"
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.get(key)
        # A new connection is accepted, and gets nothing either.
        async with connect(proxy) as fresh:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await fresh.ping()
        assert proxy.statistics().connections_accepted == 3
        await proxy.heal()
        async with connect(proxy) as fresh:
            assert await fresh.get(key) == b"v"
        assert await client.get(key) == b"v"  # the timed-out connection was replaced
        assert await idle.get(key) == b"v"  # one that lost nothing carries on
        assert proxy.statistics().connections_accepted == 5


async def test_refuse_fails_fast_and_unrefuse_listens_on_the_same_port(
    proxy: FaultProxy, key: str
) -> None:
    port = proxy.port
    async with connect(proxy) as client:
        await client.set(key, "v")
        proxy.refuse()
        assert proxy.statistics().connections_open == 0
        started = time.perf_counter()
        with pytest.raises(RedisConnectionError):
            await client.get(key)  # its connection was closed, and reconnecting is refused
        async with connect(proxy) as fresh:
            with pytest.raises(
                RedisConnectionError, match=f"Error {errno.ECONNREFUSED} connecting"
            ):
                await fresh.ping()
        assert time.perf_counter() - started < 0.5
        await proxy.unrefuse()
        assert proxy.port == port
        assert await client.get(key) == b"v"


async def test_reset_aborts_an_in_flight_command(
    proxy: FaultProxy, direct: redis.Redis, key: str
) -> None:
    async with connect(proxy) as client:
        await client.set(key, "v")
        proxy.hold()
        command = asyncio.create_task(get(client, key))
        await proxy.wait_held(1)
        proxy.reset()
        with pytest.raises(RedisConnectionError, match="reset"):
            await command
        assert proxy.held == []
        proxy.unhold()
        assert await client.get(key) == b"v"
    # Mid-reply: the first bytes of a slow large reply arrived, then the RST.
    await direct.set(key, b"x" * BIG)
    async with connect(proxy) as client:
        await client.ping()
        proxy.downstream_bandwidth = 2_000_000
        command = asyncio.create_task(get(client, key))
        before = proxy.statistics().bytes_downstream
        await wait_for(lambda: proxy.statistics().bytes_downstream > before)
        proxy.reset()
        with pytest.raises(RedisConnectionError):
            await command


async def test_truncate_breaks_exactly_one_reply(proxy: FaultProxy, key: str) -> None:
    async with connect(proxy) as client, connect(proxy) as other:
        await client.set(key, "x" * 100)
        await other.ping()
        proxy.truncate_next_reply(5)
        with pytest.raises(RedisConnectionError):
            await client.get(key)
        assert await other.get(key) == b"x" * 100
        assert await client.get(key) == b"x" * 100
        assert proxy.statistics().connections_accepted == 3


async def test_step_mode_holds_each_request_until_released(proxy: FaultProxy, key: str) -> None:
    async with connect(proxy) as first, connect(proxy) as second:
        await first.mset({key: "v", f"{key}:2": "w"})
        await second.ping()
        proxy.hold()
        one = asyncio.create_task(get(first, key))
        held = await proxy.wait_held(1)
        assert b"GET" in held[0].data
        assert key.encode() in held[0].data
        two = asyncio.create_task(get(second, f"{key}:2"))
        held = await proxy.wait_held(2)
        assert f"{key}:2".encode() in held[1].data
        assert held[0].connection != held[1].connection
        # Nothing gets through on its own.
        done, _ = await asyncio.wait({one, two}, timeout=0.1)
        assert not done
        assert [chunk.data for chunk in proxy.release()] == [held[0].data]
        assert await one == b"v"
        assert not two.done()
        proxy.release_all()
        assert await two == b"w"
        with pytest.raises(ValueError, match="release"):
            proxy.release()
        proxy.unhold()
        assert await first.get(key) == b"v"


async def test_held_chunks_keep_their_order(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        proxy.hold()
        # Two separate writes of inline commands, each its own chunk.
        writer.write(b"PING\r\n")
        await proxy.wait_held(1)
        writer.write(b"ECHO hi\r\n")
        await proxy.wait_held(2)
        assert [chunk.data for chunk in proxy.held] == [b"PING\r\n", b"ECHO hi\r\n"]
        proxy.release()
        assert await reader.readexactly(7) == b"+PONG\r\n"
        proxy.release()
        assert await reader.readexactly(8) == b"$2\r\nhi\r\n"
    finally:
        writer.close()


async def test_cancelled_while_held_then_released_leaves_the_pool_usable(
    proxy: FaultProxy, key: str
) -> None:
    async with connect(proxy) as client:
        await client.set(key, "v")
        await client.set(f"{key}:other", "w")
        proxy.hold()
        command = asyncio.create_task(get(client, key))
        await proxy.wait_held(1)
        command.cancel()
        with pytest.raises(asyncio.CancelledError):
            await command
        # The request left the client; the server still gets it once released.
        assert b"GET" in proxy.held[0].data
        proxy.release()
        proxy.unhold()
        assert await client.get(f"{key}:other") == b"w"
        assert await client.get(key) == b"v"
        assert await client.ping() is True


async def test_kill_connections_closes_them_and_clients_reconnect(
    proxy: FaultProxy, key: str
) -> None:
    # redis-py's default retries, as users have them: a closed pooled connection is replaced.
    async with redis.Redis(port=proxy.port) as client:
        await client.set(key, "v")
        proxy.kill_connections()
        assert proxy.statistics().connections_open == 0
        assert await client.get(key) == b"v"
        assert proxy.statistics().connections_accepted == 2


@pytest.mark.parametrize("fault", ["blackhole", "hold"])
async def test_aclose_returns_promptly_and_leaves_no_tasks(
    redis_server: RedisServer, key: str, fault: str
) -> None:
    before = other_tasks()
    proxy = await FaultProxy(redis_server.port).start()
    async with connect(proxy) as client:
        await client.ping()
        if fault == "hold":
            proxy.hold()
            command = asyncio.create_task(get(client, key))
            await proxy.wait_held(1)
        else:
            proxy.blackhole()
            command = asyncio.create_task(get(client, key))
            await wait_for(lambda: proxy.statistics().bytes_swallowed > 0)
        async with asyncio.timeout(1.0):
            await proxy.aclose()
        with pytest.raises(RedisConnectionError):
            await command
    assert other_tasks() <= before


def test_fault_settings_are_validated() -> None:
    proxy = FaultProxy(6379)
    with pytest.raises(ConfigurationError, match="upstream_latency"):
        proxy.upstream_latency = -1.0
    with pytest.raises(ConfigurationError, match="downstream_bandwidth"):
        proxy.downstream_bandwidth = 0
    with pytest.raises(ConfigurationError, match="nbytes"):
        proxy.truncate_next_reply(-1)
    proxy.upstream_bandwidth = 1000
    assert proxy.upstream_bandwidth == 1000.0
