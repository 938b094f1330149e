"""
Family (g): the waiters' pub/sub connection is killed (``CLIENT KILL TYPE pubsub``) at the
moment of the fill, so the fill's notification is published to nobody.

Setup: process A holds the rebuild lock of 5 keys (its loader gated); process B has 10
waiters on each key, subscribed. The lease is 10 s and ``wait_timeout`` 30 s, so a waiter
that is not woken by its re-subscription would sleep until the lease can have run out.

Asserted: every one of the 50 waiters gets A's value within 2 s of the fill (bound; measured
about 0.1-0.2 s; without the re-check on re-subscription: 10 s, the lease), B never calls its
loader (one load per key in all), Redis holds A's values, and no lock, subscription or task
is left.

Two moments: the connection is closed and cannot come back until the fill is published
(B's own proxy closes it and refuses new connections meanwhile, so the fill provably reaches
no subscriber: ``PUBSUB NUMSUB`` is 0), and the connection is killed while A's fill command
is held on the wire by a step-mode proxy (the kill and the fill race as in production).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import FaultProxy, RedisServer

from ..helpers import GatedLoader, wait_until
from .checks import assert_nothing_left, through

POLICY = Policy(ttl=30.0, lock_ttl=10.0, wait_timeout=30.0)
KEYS = [f"k{i}" for i in range(5)]


async def numsub(client: redis.Redis, channel: bytes) -> int:
    ((_, count),) = await client.pubsub_numsub(channel)
    return int(count)


@pytest.mark.parametrize("moment", ["down across the fill", "during the fill"])
async def test_waiters_recheck_when_resubscribed(
    client: redis.Redis, redis_server: RedisServer, proxy: FaultProxy, namespace: str, moment: str
) -> None:
    holder_client = through(proxy.port, f"{namespace}-a")
    waiters_proxy = await FaultProxy(redis_server.port).start()
    # redis-py's default retries, so the pub/sub connection comes back as soon as it can.
    waiter_client = redis.Redis(port=waiters_proxy.port, client_name=f"{namespace}-b")
    async with (
        Cache(holder_client, namespace=namespace, policy=POLICY) as a,
        Cache(waiter_client, namespace=namespace, policy=POLICY) as b,
    ):
        loaders = {key: GatedLoader(f"{key} from A") for key in KEYS}
        holders = [asyncio.create_task(a.get_or_load(key, loaders[key])) for key in KEYS]
        for loader in loaders.values():
            await asyncio.wait_for(loader.started.wait(), 5)
        own = GatedLoader("loaded by B")
        own.release.set()
        waiters = {
            key: [asyncio.create_task(b.get_or_load(key, own)) for _ in range(10)] for key in KEYS
        }
        channels = [b.keys.channel(b.keys.value(key)) for key in KEYS]
        for channel in channels:
            await wait_until(lambda c=channel: c in b._notifier._channels)  # type: ignore[misc]
            await asyncio.shield(b._notifier._channels[channel].ready)
        await wait_until(lambda: b.statistics().lock_waits == 5)

        if moment == "down across the fill":
            waiters_proxy.refuse()  # closes B's connections, the pub/sub one among them
            async with asyncio.timeout(5):
                while await numsub(client, channels[0]):
                    await asyncio.sleep(0.005)
            for loader in loaders.values():
                loader.release.set()
            await asyncio.gather(*holders)  # filled, and published to nobody:
            assert [await numsub(client, c) for c in channels] == [0] * 5
            await waiters_proxy.unrefuse()
        else:
            proxy.hold()
            for loader in loaders.values():
                loader.release.set()
            await proxy.wait_held(1)  # the first fill is on the wire
            assert await client.client_kill_filter(_type="pubsub") >= 1
            proxy.unhold()
            await asyncio.gather(*holders)
        filled = time.monotonic()
        async with asyncio.timeout(15):
            results = {key: await asyncio.gather(*tasks) for key, tasks in waiters.items()}
        waited = time.monotonic() - filled
        assert results == {key: [f"{key} from A"] * 10 for key in KEYS}
        assert waited < 2.0, f"waiters slept {waited:.1f}s after the fill (lease: 10 s)"
        assert own.calls == 0 and sum(loader.calls for loader in loaders.values()) == 5
        assert [await b.get(key) for key in KEYS] == [f"{key} from A" for key in KEYS]
    await holder_client.aclose()
    await waiter_client.aclose()
    await waiters_proxy.aclose()
    await assert_nothing_left(client, namespace, name=f"{namespace}-a")
    await assert_nothing_left(client, namespace, name=f"{namespace}-b")
