"""
Family (h): Sentinel fails over in the middle of a stampede. The primary is stopped while
rounds of 200 concurrent callers over 10 keys run against it; the sentinel promotes the
replica after about 2-3 s (``down-after-milliseconds`` 1000).

Asserted, across the whole failover:
    - every caller gets its key's value (from Redis, or from its loader while Redis cannot
      answer), never an error, and no round takes longer than 3 s (command budget 0.5 s);
    - loads per key per round: at most one (the flight holds with Redis down);
    - once promoted, writes land on the new primary within 15 s, and the newest value is
      what Redis holds and callers get; locks left by the old primary's replication expire
      within their 1 s lease, and no lock, subscription or task is left.

`tests/test_contract.py::test_sentinel_failover_keeps_callers_served` covers sequential
callers; `tests/test_breaker.py::test_sentinel_replica_serves_while_the_primary_fails_over`
reads from the replica during the failover.
"""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

from aiocacheguard import BackendError, Cache, Policy
from aiocacheguard.testing import RedisSentinelServer

from .checks import assert_nothing_left

KEYS = [f"k{i}" for i in range(10)]


@pytest.mark.slow
async def test_failover_mid_stampede(namespace: str) -> None:
    with RedisSentinelServer() as deployment:
        sentinel = Sentinel(deployment.sentinels, socket_timeout=0.5)
        client = sentinel.master_for(deployment.service, socket_timeout=0.5)
        database = dict.fromkeys(KEYS, 0)
        calls: dict[str, int] = {}

        async def load(key: str) -> str:
            calls[key] = calls.get(key, 0) + 1
            await asyncio.sleep(0.01)
            return f"{key} v{database[key]}"

        async def round_of_callers(cache: Cache) -> float:
            calls.clear()
            began = time.monotonic()
            got = await asyncio.gather(
                *(
                    cache.get_or_load(key, functools.partial(load, key))
                    for key in KEYS
                    for _ in range(20)
                )
            )
            assert got == [f"{key} v{database[key]}" for key in KEYS for _ in range(20)]
            assert max(calls.values(), default=0) <= 1, calls
            return time.monotonic() - began

        policy = Policy(ttl=60.0, lock_ttl=1.0)
        async with Cache(client, namespace=namespace, policy=policy, command_timeout=0.5) as c:
            await round_of_callers(c)  # cached on the primary
            old = deployment.primary
            assert old is not None
            stopping = asyncio.create_task(asyncio.to_thread(old.stop))
            slowest, rounds = 0.0, 0
            deadline = time.monotonic() + 30
            while True:
                slowest = max(slowest, await round_of_callers(c))
                rounds += 1
                try:
                    address = await sentinel.discover_master(deployment.service)
                except MasterNotFoundError:
                    address = ("", old.port)
                if address[1] != old.port:
                    break
                assert time.monotonic() < deadline, "no failover within 30 s"
            await stopping
            assert rounds >= 2 and slowest < 3.0, (rounds, slowest)
            # Writes resume on the promoted primary (the breaker lets them through soon).
            for key in KEYS:
                database[key] += 1
            async with asyncio.timeout(15):
                while True:
                    try:
                        await c.set(KEYS[0], f"{KEYS[0]} v{database[KEYS[0]]}")
                        break
                    except BackendError:
                        await asyncio.sleep(0.1)
            for key in KEYS[1:]:
                await c.set(key, f"{key} v{database[key]}")
            calls.clear()
            assert [await c.get(key) for key in KEYS] == [f"{key} v1" for key in KEYS]
            await round_of_callers(c)
            assert calls == {}  # all hits on the new primary
        await assert_nothing_left(client, namespace)
        await client.aclose()
        for sentinel_client in sentinel.sentinels:
            await sentinel_client.aclose()
