"""
Family (f): cancellation storms. A caller may be cancelled at any await point of a miss; a
flight with a single caller is then cancelled too (nobody wants its result), and whatever it
had started must be undone.

1. Every await point, deterministically: a step-mode proxy holds each command of a miss on
   the wire (the read, the lock acquisition, the fill), and the loader is gated; the single
   caller is cancelled at each point in turn. Asserted at each: the caller sees
   `CancelledError` at once (within 1 s); then no lock, subscription or task is left (within
   the 5 s of `assert_nothing_left`, although the lease is 10 s), the loader ran at most
   once, and a new call gets the right value.
2. A storm: 200 keys, one caller each, all cancelled at random moments (0-300 ms, against a
   10 ms proxy latency each way), three times over. Asserted: nothing is left, then every
   key loads its own value, with at most one load per key per attempt (4 in all).

`tests/test_cancellation.py` covers cancelling some of many callers of one key (the others
are served); `tests/test_miss_path_faults.py` the acquisition whose answer nobody reads.
"""

from __future__ import annotations

import asyncio
import functools
import random

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import FaultProxy

from ..helpers import GatedLoader
from .checks import assert_nothing_left, through

POLICY = Policy(ttl=30.0, lock_ttl=10.0)
POINTS = ["read on the wire", "acquire on the wire", "loader running", "fill on the wire"]


@pytest.mark.parametrize("point", POINTS)
async def test_a_single_caller_cancelled_at_each_await_point(
    client: redis.Redis, proxy: FaultProxy, namespace: str, point: str
) -> None:
    name = f"{namespace}-steps"
    stepped = through(proxy.port, name)
    async with Cache(stepped, namespace=namespace, policy=POLICY) as cache:
        warm = GatedLoader("warm")
        warm.release.set()
        await cache.get_or_load("warm", warm)  # connection open, scripts loaded
        loader = GatedLoader("v")
        proxy.hold()
        caller = asyncio.create_task(cache.get_or_load("k", loader))
        sent = [(await proxy.wait_held(1))[0].data]  # the read
        if point != "read on the wire":
            proxy.release(1)
            sent.append((await proxy.wait_held(1))[0].data)  # the acquisition
            assert b"EVALSHA" in sent[-1]
        if point in ("loader running", "fill on the wire"):
            proxy.release(1)
            await asyncio.wait_for(loader.started.wait(), 5)
        if point == "fill on the wire":
            loader.release.set()
            sent.append((await proxy.wait_held(1))[0].data)
            assert b"EVALSHA" in sent[-1]
        caller.cancel()
        async with asyncio.timeout(1):
            with pytest.raises(asyncio.CancelledError):
                await caller
        proxy.unhold()
        assert loader.calls <= 1
        if point == "loader running":
            await asyncio.wait_for(loader.cancelled.wait(), 1)  # nobody wants its result
        await assert_nothing_left(client, namespace)  # the lock is undone, not left to expire
        again = GatedLoader("v")
        again.release.set()
        assert await cache.get_or_load("k", again) == "v"
    await stepped.aclose()
    await assert_nothing_left(client, namespace, name=name)


async def test_a_storm_of_cancelled_single_caller_flights(
    client: redis.Redis, proxy: FaultProxy, namespace: str
) -> None:
    name = f"{namespace}-storm"
    slow = through(proxy.port, name)
    rng = random.Random(14)
    calls: dict[int, int] = {}

    async def load(i: int) -> str:
        calls[i] = calls.get(i, 0) + 1
        await asyncio.sleep(0.01)
        return f"value {i}"

    async with Cache(slow, namespace=namespace, policy=POLICY) as cache:
        await cache.set("warm", 1)
        proxy.upstream_latency = proxy.downstream_latency = 0.01
        outcomes = {"served": 0, "cancelled": 0}
        for _ in range(3):
            storm = [
                asyncio.wait_for(
                    cache.get_or_load(f"k{i}", functools.partial(load, i)), rng.uniform(0, 0.3)
                )
                for i in range(200)
            ]
            results = await asyncio.gather(*storm, return_exceptions=True)
            for i, result in enumerate(results):
                assert result == f"value {i}" or isinstance(result, TimeoutError), result
                outcomes["served" if result == f"value {i}" else "cancelled"] += 1
            await assert_nothing_left(client, namespace)
        assert min(outcomes.values()) >= 50, outcomes  # cancelled at every stage
        proxy.upstream_latency = proxy.downstream_latency = 0.0
        got = await asyncio.gather(
            *(cache.get_or_load(f"k{i}", functools.partial(load, i)) for i in range(200))
        )
        assert got == [f"value {i}" for i in range(200)]
        assert max(calls.values()) <= 4, calls
    await slow.aclose()
    await assert_nothing_left(client, namespace, name=name)
