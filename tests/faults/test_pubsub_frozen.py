"""
Family (k): the waiters' pub/sub connection freezes: TCP stays open, nothing flows (a dropped
NAT or load-balancer entry), and no error ever comes. Only that one connection: the
`FaultProxy` blackholes it alone, so the Cache's other commands (a plain ``get``) go on.

Setup: process A (direct client) holds the rebuild lock of a key, its loader gated; process
B (through the proxy, health interval `HEALTH`) has 10 waiters on the key. A round measures
the time from A's fill to B's waiters' results: woken by the fill's notification it is a
few milliseconds; without one they sleep until the holder's lease can have run out (the
lease is `LEASE`).

Asserted: B's pub/sub connection is found silent and replaced within two health intervals
of the freeze (``pubsub_renewals`` 1, said in one WARNING); rounds after that are woken by
notification again (each well under the lease); no waiter loads by itself; nothing is left.
Before the health check, every round after the freeze slept the whole lease, forever.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import FaultProxy, RedisServer

from ..helpers import GatedLoader, wait_until
from .checks import assert_nothing_left, through

HEALTH = 0.2
LEASE = 3.0
#: A round woken by notification takes milliseconds; this leaves room for a loaded machine
#: while staying far below the lease a round without one sleeps.
WOKEN = 0.5
POLICY = Policy(ttl=30.0, lock_ttl=LEASE, wait_timeout=30.0)


async def pubsub_connection(proxy: FaultProxy, direct: redis.Redis, name: str) -> int:
    """
    The proxy's id of the pub/sub connection of the client named ``name``: the one whose
    last command was a pub/sub one (the pool's connections send none).
    """
    pubsub = [
        c
        for c in await direct.client_list()
        if c.get("name") == name and c["cmd"] in ("subscribe", "unsubscribe", "ping")
    ]
    (info,) = pubsub
    port = int(info["addr"].rsplit(":", 1)[1])
    (connection,) = [c for c, p in proxy.connections.items() if p == port]
    return connection


async def round_(a: Cache, b: Cache, key: str, own: GatedLoader) -> float:
    """One stampede on ``key``: seconds from A's fill to B's 10 waiters' results."""
    loader = GatedLoader(f"{key} from A")
    holder = asyncio.create_task(a.get_or_load(key, loader))
    await asyncio.wait_for(loader.started.wait(), 5)
    before = b.statistics()
    waiters = [asyncio.create_task(b.get_or_load(key, own)) for _ in range(10)]
    channel = b.keys.channel(b.keys.value(key))
    await wait_until(lambda: b.statistics().lock_waits > before.lock_waits)
    # Subscribed, refused, or gone without a subscription (notify_fallbacks): a fill from
    # now on is either notified or slept through.
    await wait_until(
        lambda: (
            channel in b._notifier._channels
            or b.statistics().notify_fallbacks > before.notify_fallbacks
        )
    )
    entry = b._notifier._channels.get(channel)
    if entry is not None:
        await asyncio.gather(asyncio.shield(entry.ready), return_exceptions=True)
    loader.release.set()
    await holder
    filled = time.monotonic()
    async with asyncio.timeout(LEASE + 5):
        results = await asyncio.gather(*waiters)
    assert results == [f"{key} from A"] * 10
    return time.monotonic() - filled


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_frozen_pubsub_connection_is_replaced_and_waiters_notified_again(
    client: redis.Redis,
    redis_server: RedisServer,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    protocol: int,
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    name = f"{namespace}-b"
    async with FaultProxy(redis_server.port) as proxy:
        # RESP2 and RESP3 answer a PING on a subscribed connection differently.
        waiter_client = through(proxy.port, name, protocol=protocol)
        try:
            async with (
                Cache(client, namespace=namespace, policy=POLICY) as a,
                Cache(waiter_client, namespace=namespace, policy=POLICY) as b,
            ):
                subscriber = b._backend._pubsub
                assert subscriber is not None
                subscriber.health_interval = HEALTH
                own = GatedLoader("loaded by B")
                own.release.set()

                # Warm: notified at once; then its connection is found (its last command was
                # UNSUBSCRIBE, or a health PING).
                assert await round_(a, b, "warm", own) < WOKEN
                connection = await pubsub_connection(proxy, client, name)

                proxy.blackhole(connection=connection)
                frozen, frozen_wall = time.monotonic(), time.time()
                assert await b.get("warm") == "warm from A"  # the rest of B is fine
                # Rounds go on through the freeze; those that begin two health intervals after
                # it (and a margin for a shared machine) must be woken by notification again.
                after = frozen + 2 * HEALTH + 0.5
                rounds: list[tuple[float, float]] = []
                while len([began for began, _ in rounds if began >= after]) < 3:
                    began = time.monotonic()
                    rounds.append((began, await round_(a, b, f"k{len(rounds)}", own)))
                late = [round(took, 2) for began, took in rounds if began >= after]
                assert all(t < WOKEN for t in late), f"rounds took {late} (lease {LEASE}s)"
                stats = b.statistics()
                assert own.calls == 0 and stats.loader_calls == 0
                assert stats.pubsub_renewals == 1
        finally:
            await waiter_client.aclose()
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "went silent" in said[0].getMessage(), said
    detected = said[0].created - frozen_wall
    assert detected < 2 * HEALTH + 0.5, f"found after {detected:.2f}s"
    await assert_nothing_left(client, namespace, name=name)


async def test_waiters_parked_on_a_connection_that_freezes_are_woken_by_its_replacement(
    client: redis.Redis, redis_server: RedisServer, namespace: str
) -> None:
    # The freeze comes while B's waiters are subscribed and parked: the fill's notification
    # is lost in the blackhole; the replacement must wake them to re-read Redis.
    name = f"{namespace}-b"
    async with FaultProxy(redis_server.port) as proxy:
        waiter_client = through(proxy.port, name)
        try:
            async with (
                Cache(client, namespace=namespace, policy=POLICY) as a,
                Cache(waiter_client, namespace=namespace, policy=POLICY) as b,
            ):
                subscriber = b._backend._pubsub
                assert subscriber is not None
                subscriber.health_interval = HEALTH
                own = GatedLoader("loaded by B")
                own.release.set()
                loader = GatedLoader("k from A")
                holder = asyncio.create_task(a.get_or_load("k", loader))
                await asyncio.wait_for(loader.started.wait(), 5)
                waiters = [asyncio.create_task(b.get_or_load("k", own)) for _ in range(10)]
                channel = b.keys.channel(b.keys.value("k"))
                await wait_until(lambda: channel in b._notifier._channels)
                await asyncio.shield(b._notifier._channels[channel].ready)
                proxy.blackhole(connection=await pubsub_connection(proxy, client, name))
                loader.release.set()
                await holder
                filled = time.monotonic()
                async with asyncio.timeout(LEASE + 5):
                    results = await asyncio.gather(*waiters)
                waited = time.monotonic() - filled
                assert results == ["k from A"] * 10 and own.calls == 0
                assert waited < 2 * HEALTH + WOKEN, f"waited {waited:.2f}s (lease {LEASE}s)"
                assert b.statistics().pubsub_renewals == 1
        finally:
            await waiter_client.aclose()
    await assert_nothing_left(client, namespace, name=name)
