"""
Family (a): Redis blackholed (bytes swallowed both ways) or refusing connections, switched on
in the middle of a stampede and under steady load.

1. Mid-stampede: process A (through the proxy, budget 0.2 s, lease 1 s) holds the rebuild
   locks of 5 keys with 100 callers each; process B (a healthy link) has 100 waiters on each
   key. The fault starts while A's loaders run; then they finish. Asserted: A's 500 callers
   get A's values within 2 s of the loaders finishing (bound: one budget and slack; redis-py's
   defaults would take 59 s blackholed); A's fills are lost, so B's waiters take the locks over
   when the lease runs out and get B's values within lease + 3 s; loads: exactly one per key
   per process; Redis ends with B's values (the newest fills); no lock, subscription, task or
   connection is left.
2. Steady load: 20 workers read and write 20 keys for about 1.6 s, through a blackhole and
   then a refusal and back. Asserted: every read returns its own key's value at a version
   no newer than the database's, or the write fails with a named `BackendError`; no call
   takes longer than 1.5 s (budget 0.2 s); after the heal, fresh writes land and Redis
   holds the newest value of every key. (Loads of one key may overlap here by design: a
   write detaches the flight in progress, whose loader may start after the write.)

3. ``aclose()`` mid-stampede while blackholed: it returns within 2 s (measured 0.2 s, one
   budget; redis-py's defaults would wait a minute per command), every caller gets
   `CacheClosedError`, every loader is cancelled; the locks the silent Redis kept expire with
   their 1 s lease, and nothing else is left.

`tests/test_breaker.py` covers the sequential caller, one load per key with Redis already
down, the p99 of 5,000 misses, the bulkhead and the open breaker's cost.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time

import pytest
import redis.asyncio as redis

from aiocacheguard import BackendError, Cache, Policy
from aiocacheguard.testing import FaultProxy

from ..helpers import GatedLoader, wait_until
from .checks import assert_nothing_left, locks_left, through

KEYS = [f"k{i}" for i in range(5)]


def switch_on(proxy: FaultProxy, fault: str) -> None:
    proxy.blackhole() if fault == "blackhole" else proxy.refuse()


@pytest.mark.parametrize("fault", ["blackhole", "refuse"])
async def test_fault_in_the_middle_of_a_stampede(
    client: redis.Redis, proxy: FaultProxy, namespace: str, fault: str
) -> None:
    policy = Policy(ttl=30.0, lock_ttl=1.0, wait_timeout=10.0)
    name = f"{namespace}-a"
    faulty = through(proxy.port, name)
    async with (
        Cache(faulty, namespace=namespace, policy=policy, command_timeout=0.2) as a,
        Cache(client, namespace=namespace, policy=policy) as b,
    ):
        await a.set("warm", 1)
        in_a = {key: GatedLoader(f"{key} from A") for key in KEYS}
        in_b = {key: GatedLoader(f"{key} from B") for key in KEYS}
        for loader in in_b.values():
            loader.release.set()
        callers_a = [a.get_or_load(key, in_a[key]) for key in KEYS for _ in range(100)]
        tasks_a = [asyncio.create_task(c) for c in callers_a]
        for loader in in_a.values():
            await asyncio.wait_for(loader.started.wait(), 5)
        tasks_b = [
            asyncio.create_task(b.get_or_load(key, in_b[key])) for key in KEYS for _ in range(100)
        ]
        await wait_until(lambda: b.statistics().lock_waits == 5)

        switch_on(proxy, fault)
        released = time.monotonic()
        for loader in in_a.values():
            loader.release.set()
        async with asyncio.timeout(10):
            got_a = await asyncio.gather(*tasks_a, return_exceptions=True)
        served_a = time.monotonic() - released
        async with asyncio.timeout(15):
            got_b = await asyncio.gather(*tasks_b, return_exceptions=True)
        served_b = time.monotonic() - released

        assert got_a == [f"{key} from A" for key in KEYS for _ in range(100)]
        assert got_b == [f"{key} from B" for key in KEYS for _ in range(100)]
        assert served_a < 2.0, served_a
        assert served_b < policy.lock_ttl + 3.0, served_b
        assert [loader.calls for loader in [*in_a.values(), *in_b.values()]] == [1] * 10
        assert b.statistics().takeovers == 5
        await proxy.heal()
        assert [await b.get(key) for key in KEYS] == [f"{key} from B" for key in KEYS]
    await faulty.aclose()
    await assert_nothing_left(client, namespace, name=name)


async def test_blackhole_then_refusal_under_steady_load(
    client: redis.Redis, proxy: FaultProxy, namespace: str
) -> None:
    name = f"{namespace}-steady"
    faulty = through(proxy.port, name)
    keys = [f"k{i}" for i in range(20)]
    database = dict.fromkeys(keys, 0)  # the source of truth: each key's current version
    slowest = 0.0
    write_errors = 0
    rng = random.Random(14)

    async def load(key: str) -> str:
        await asyncio.sleep(0.005)
        return f"{key} v{database[key]}"

    async def worker(stop: asyncio.Event) -> None:
        nonlocal slowest, write_errors
        while not stop.is_set():
            key = rng.choice(keys)
            began = time.monotonic()
            if rng.random() < 0.1:  # a write: the database first, then the cache
                database[key] += 1
                try:
                    await cache.set(key, f"{key} v{database[key]}")
                except BackendError:
                    write_errors += 1
            else:
                got = await cache.get_or_load(key, functools.partial(load, key))
                name, version = got.split(" v")
                assert name == key and int(version) <= database[key], (key, got)
            slowest = max(slowest, time.monotonic() - began)
            await asyncio.sleep(0)

    async with Cache(
        faulty, namespace=namespace, policy=Policy(ttl=30.0), command_timeout=0.2
    ) as cache:
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(stop)) for _ in range(20)]
        for fault in ("blackhole", "refuse"):
            await asyncio.sleep(0.3)  # healthy traffic
            switch_on(proxy, fault)
            await asyncio.sleep(0.5)  # traffic through the fault
            await proxy.heal()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        assert slowest < 1.5, slowest
        assert write_errors >= 1 and cache.statistics().unwritten_loads >= 1  # faults bit
        # After the heal the breaker lets writes through again within its open time.
        async with asyncio.timeout(10):
            while True:
                try:
                    await cache.set("probe", 1)
                    break
                except BackendError:
                    await asyncio.sleep(0.1)
        for key in keys:
            database[key] += 1
            await cache.set(key, f"{key} v{database[key]}")
        assert [await cache.get(key) for key in keys] == [f"{key} v{database[key]}" for key in keys]
    await faulty.aclose()
    await assert_nothing_left(client, namespace, name=name)


async def test_aclose_while_blackholed_is_bounded(
    client: redis.Redis, proxy: FaultProxy, namespace: str
) -> None:
    """Closing a Cache whose Redis went silent mid-stampede: no wait on a dead socket."""
    name = f"{namespace}-closing"
    faulty = through(proxy.port, name)
    policy = Policy(ttl=30.0, lock_ttl=1.0)
    cache = Cache(faulty, namespace=namespace, policy=policy, command_timeout=0.2)
    await cache.set("warm", 1)
    loaders = {key: GatedLoader(key) for key in KEYS}
    callers = [
        asyncio.create_task(cache.get_or_load(key, loaders[key])) for key in KEYS for _ in range(50)
    ]
    for loader in loaders.values():
        await asyncio.wait_for(loader.started.wait(), 5)
    proxy.blackhole()
    began = time.monotonic()
    await cache.aclose()
    closed = time.monotonic() - began
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert closed < 2.0, closed  # a budget or two, not redis-py's minute
    assert all(type(r).__name__ == "CacheClosedError" for r in results), results[:3]
    assert all(loader.cancelled.is_set() for loader in loaders.values())
    await faulty.aclose()
    await proxy.heal()
    # The locks the cancelled loads held could not be released through the blackhole: they
    # expire with their lease (1 s here), the one thing a silent Redis leaves behind.
    assert len(await locks_left(client, namespace)) <= len(KEYS)
    await assert_nothing_left(client, namespace, name=name)
