"""
Defects of the first miss path, reproduced with real faults: a proxy that holds commands, an
ACL that refuses SUBSCRIBE, a slow link. Each test failed on the code before the rebuild.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from aiocacheguard import BackendTimeout, Cache, Policy
from aiocacheguard.backend import RedisBackend
from aiocacheguard.guards.notify import FillNotifier
from aiocacheguard.testing import FaultProxy, RedisServer

from .helpers import GatedLoader, library_tasks, wait_until


async def acl(client: redis.Redis, *args: str) -> None:
    await client.execute_command("ACL", *args)  # type: ignore[no-untyped-call]


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(redis_server.port) as proxy:
        yield proxy


async def test_cancelling_every_caller_while_the_acquire_is_on_the_wire(
    proxy: FaultProxy, client: redis.Redis, namespace: str
) -> None:
    """The acquisition nobody reads the answer of must not leave a lock nobody owns."""
    through = redis.Redis(port=proxy.port)
    policy = Policy(ttl=30.0, lock_ttl=10.0)
    async with Cache(through, namespace=namespace, policy=policy) as cache:
        warm = GatedLoader("warm")
        warm.release.set()
        await cache.get_or_load("warm-up", warm)  # scripts loaded, connection open
        lock = cache.keys.lock(cache.keys.value("k"))
        proxy.hold()
        loader = GatedLoader("v")
        callers = [asyncio.create_task(cache.get_or_load("k", loader)) for _ in range(5)]
        while b"EVALSHA" not in (await proxy.wait_held(1))[0].data:
            proxy.release(1)  # the read (a miss) goes through; the acquisition is held
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        proxy.unhold()  # now the acquisition reaches Redis and takes the lock
        # ... and is undone once its answer arrives: well before the 10 s lease.
        async with asyncio.timeout(3):
            await wait_until(lambda: not library_tasks())
            while await client.exists(lock):
                await asyncio.sleep(0.01)
        assert loader.calls == 0
    await through.aclose()


async def test_waiters_without_pub_sub_wait_for_the_holder(
    redis_server: RedisServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL without SUBSCRIBE: waiters re-check at the lease instead of loading themselves."""
    user = f"nosub-{uuid.uuid4().hex[:8]}"
    await acl(
        client, "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-subscribe", "-psubscribe"
    )
    limited = redis.Redis(port=redis_server.port, username=user, password="pw")
    policy = Policy(ttl=30.0, lock_ttl=1.0)
    try:
        async with (
            Cache(client, namespace=namespace, policy=policy) as holder,
            Cache(limited, namespace=namespace, policy=policy) as waiter,
        ):
            held = GatedLoader("filled")
            holding = asyncio.create_task(holder.get_or_load("k", held))
            await held.started.wait()
            own = GatedLoader("own")
            own.release.set()
            waiting = [asyncio.create_task(waiter.get_or_load("k", own)) for _ in range(50)]
            await wait_until(lambda: waiter.statistics().lock_waits > 0)
            held.release.set()
            async with asyncio.timeout(5):
                assert await asyncio.gather(*waiting) == ["filled"] * 50
            assert await holding == "filled"
            assert own.calls == 0 and held.calls == 1  # one load in total
            assert waiter.statistics().notify_fallbacks >= 1
            assert "pub/sub notifications are unavailable" in caplog.text
            assert caplog.text.count("pub/sub notifications are unavailable") == 1
    finally:
        await limited.aclose()
        await acl(client, "DELUSER", user)


async def test_one_large_value_does_not_fail_the_reads_batched_with_it(
    proxy: FaultProxy, client: redis.Redis, namespace: str
) -> None:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=60.0)) as writer:
        await writer.set("big", "x" * 1_000_000)
        for i in range(20):
            await writer.set(f"small{i}", i)
    through = redis.Redis(port=proxy.port)
    async with Cache(
        through, namespace=namespace, policy=Policy(ttl=60.0), command_timeout=0.4
    ) as cache:
        assert await cache.get("small0") == 0  # connections open before the link slows
        proxy.downstream_bandwidth = 1_000_000  # a 1 MB value takes about a second
        reads = [cache.get(f"small{i}") for i in range(20)]
        results = await asyncio.gather(cache.get("big"), *reads, return_exceptions=True)
        assert isinstance(results[0], BackendTimeout)  # the big one fails alone
        assert results[1:] == list(range(20))
    await through.aclose()


async def test_a_large_value_batched_with_small_ones_fails_alone(
    proxy: FaultProxy, client: redis.Redis, namespace: str
) -> None:
    """The same, with the big value in the very MGET of the small ones: a batch that times
    out is retried read by read, so only the big one fails (and the breaker stays closed)."""
    async with Cache(client, namespace=namespace, policy=Policy(ttl=60.0)) as writer:
        await writer.set("big", "x" * 1_000_000)
        for i in range(20):
            await writer.set(f"small{i}", i)
    through = redis.Redis(port=proxy.port)
    async with Cache(
        through, namespace=namespace, policy=Policy(ttl=60.0), command_timeout=0.4
    ) as cache:
        assert await cache.get("small0") == 0  # connections open before the link slows
        proxy.downstream_bandwidth = 1_000_000  # a 1 MB reply takes about a second
        reads = [cache.get(f"small{i}") for i in range(20)]
        # The first read goes alone; the big one and the twenty others leave as one MGET.
        results = await asyncio.gather(
            cache.get("small0"), cache.get("big"), *reads, return_exceptions=True
        )
        assert results[0] == 0
        assert isinstance(results[1], BackendTimeout)
        assert results[2:] == list(range(20))
        assert cache.breaker is not None and cache.breaker.closed
    await through.aclose()


async def test_batches_of_one_turn_leave_side_by_side(
    proxy: FaultProxy, client: redis.Redis, namespace: str
) -> None:
    """1,024 reads queued in one turn used to leave as four round trips one after another."""
    async with Cache(client, namespace=namespace, policy=Policy(ttl=60.0)) as writer:
        await writer.set("k", "v")
    through = redis.Redis(port=proxy.port)
    async with Cache(through, namespace=namespace, policy=Policy(ttl=60.0)) as cache:
        proxy.downstream_latency = 0.05
        keys = [f"missing{i}" for i in range(1024)]
        assert await asyncio.gather(cache.get("k"), *map(cache.get, keys)) == ["v"] + [None] * 1024
        # The first read went alone; the 1,024 others in four batches at once, each on a
        # connection of its own.
        assert proxy.statistics().connections_accepted >= 5
    await through.aclose()


async def test_a_listener_arriving_while_its_channel_is_left_is_not_deaf(
    client: redis.Redis, namespace: str
) -> None:
    backend = RedisBackend(client, command_timeout=1.0)
    notifier = FillNotifier()
    notifier.bind(backend.subscriber(notifier.deliver))
    channel = f"{namespace}:fill".encode()
    leave = asyncio.Event()

    async def first() -> None:
        async with notifier.listen(channel):
            await leave.wait()

    async def second() -> bool:
        await leave.wait()  # wakes in the same turn as first() leaves
        async with notifier.listen(channel) as signal:
            await client.publish(channel, b"filled")
            return await signal.wait_notified(2.0)

    try:
        listening = asyncio.create_task(first())
        await wait_until(lambda: channel in notifier._channels)
        await asyncio.shield(notifier._channels[channel].ready)
        arriving = asyncio.create_task(second())
        await asyncio.sleep(0)
        leave.set()
        await listening
        assert await arriving
    finally:
        await notifier.aclose()
        await backend.aclose()


async def test_a_failing_subscribe_is_said_once(
    redis_server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    user = f"nosub-{uuid.uuid4().hex[:8]}"
    await acl(client, "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-subscribe")
    limited = redis.Redis(port=redis_server.port, username=user, password="pw")
    backend = RedisBackend(limited, command_timeout=1.0)
    notifier = FillNotifier()
    notifier.bind(backend.subscriber(notifier.deliver))
    try:
        for i in range(3):
            async with asyncio.timeout(0.5):  # refused at once, not after the command budget
                async with notifier.listen(f"c{i}".encode()) as signal:
                    assert not signal.live
        assert notifier.fallbacks == 3
    finally:
        await notifier.aclose()
        await backend.aclose()
        await limited.aclose()
        await acl(client, "DELUSER", user)


async def test_cancelling_one_reader_of_a_shared_read_leaves_the_others_served(
    proxy: FaultProxy, client: redis.Redis, namespace: str
) -> None:
    """The joiners of one read shared a future: cancelling one cancelled it for all."""
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as writer:
        await writer.set("k", "v")
    through = redis.Redis(port=proxy.port)
    async with Cache(through, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        await cache.get("warm-up")  # the connection is open
        proxy.hold()
        first = asyncio.create_task(cache.get("k"))
        await proxy.wait_held(1)  # its GET is on the wire
        joiners = [asyncio.create_task(cache.get("k")) for _ in range(3)]
        await asyncio.sleep(0)  # they join the read
        joiners[0].cancel()
        proxy.unhold()
        assert await first == "v"
        assert await asyncio.gather(*joiners[1:]) == ["v", "v"]
        with pytest.raises(asyncio.CancelledError):
            await joiners[0]

        async def never() -> str:
            raise AssertionError("a hit")

        proxy.hold()
        loads = [asyncio.create_task(cache.get_or_load("k", never)) for _ in range(3)]
        await proxy.wait_held(1)
        await asyncio.sleep(0)
        loads[1].cancel()
        proxy.unhold()
        assert await loads[0] == "v" and await loads[2] == "v"
    await through.aclose()
