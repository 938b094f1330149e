"""
Family (b): Redis restarts in the middle of a load. The restart loses everything the
library keeps in Redis at once: the rebuild lock (so the holder's lease is gone), the loaded
scripts (``NOSCRIPT`` on the next ``EVALSHA``), every connection, and the waiters' pub/sub
subscriptions (so a fill notification can be lost).

Setup: a Redis of its own; process A holds the lock of a key (its loader gated), process B
has 20 waiters on it (lease 10 s, ``wait_timeout`` 30 s). Both use redis-py's default client,
as applications do. Redis is stopped and started again on the same port.

Asserted:
    - B's waiters re-check when their subscription comes back, find the lock gone and take
      it over: B's loader starts within 3 s of the restart (bound; the lease is 10 s), and
      all 20 waiters get B's value;
    - A's callers get A's value (their own load), but A's fill is refused, because its lock
      passed to B: Redis ends with B's value, the newest fill (``lock_lost`` = 1 on A);
    - two loads in all (one per process; the lost lock costs one duplicate, never more);
    - the scripts are reloaded after ``NOSCRIPT`` without an error reaching anyone;
    - no lock, subscription, task or connection is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisServer

from ..helpers import GatedLoader, command_calls, wait_until
from .checks import assert_nothing_left

POLICY = Policy(ttl=30.0, lock_ttl=10.0, wait_timeout=30.0)


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    """A Redis of its own, and the one that replaces it on the same port when restarted."""
    running: list[RedisServer] = []
    try:
        yield running
    finally:
        for server in running:
            server.stop()


def restart(servers: list[RedisServer]) -> None:
    old = servers[-1]
    old.stop()
    servers.append(RedisServer(port=old.port).start())


async def test_restart_mid_load(servers: list[RedisServer], namespace: str) -> None:
    server = RedisServer().start()
    servers.append(server)
    direct = redis.Redis(port=server.port)
    clients = [redis.Redis(port=server.port, client_name=f"{namespace}-{p}") for p in "ab"]
    async with (
        Cache(clients[0], namespace=namespace, policy=POLICY) as a,
        Cache(clients[1], namespace=namespace, policy=POLICY) as b,
    ):
        await a.set("warm", 1)  # scripts loaded before the restart flushes them
        await b.set("warm", 1)
        from_a, from_b = GatedLoader("from A"), GatedLoader("from B")
        holder = asyncio.create_task(a.get_or_load("k", from_a))
        await asyncio.wait_for(from_a.started.wait(), 5)
        waiters = [asyncio.create_task(b.get_or_load("k", from_b)) for _ in range(20)]
        await wait_until(lambda: b.statistics().lock_waits == 1)
        channel = b.keys.channel(b.keys.value("k"))
        await asyncio.shield(b._notifier._channels[channel].ready)

        await asyncio.to_thread(restart, servers)
        restarted = time.monotonic()
        await asyncio.wait_for(from_b.started.wait(), 15)
        took_over = time.monotonic() - restarted
        from_b.release.set()
        async with asyncio.timeout(5):
            assert await asyncio.gather(*waiters) == ["from B"] * 20
        from_a.release.set()
        assert await asyncio.wait_for(holder, 5) == "from A"

        assert took_over < 3.0, f"B took over {took_over:.1f}s after the restart (lease 10 s)"
        assert (from_a.calls, from_b.calls) == (1, 1)
        assert a.statistics().lock_lost == 1
        assert await a.get("k") == "from B" and await b.get("k") == "from B"
        # The new server answered NOSCRIPT at least once, and the scripts were loaded again.
        errors = await direct.info("errorstats")
        assert int(errors["errorstat_NOSCRIPT"]["count"]) >= 1, errors
        assert await command_calls(direct, "script|load", "eval") >= 1
    for client in clients:
        await client.aclose()
    for p in "ab":
        await assert_nothing_left(direct, namespace, name=f"{namespace}-{p}")
    await direct.aclose()
