"""
Family (j): the L1's invalidation listener stops listening, for whatever reason.

The L1 serves only while its listener hears every write; a listener that stops without
saying so leaves the L1 serving what it held, forever. Three ways to stop it, against a
real redis-server:

- **An ACL user without PING** (``ACL SETUSER ... -ping``), from the start or revoked while
  the listener runs: its health PING, sent after a quiet ``health_interval``, gets
  ``NOPERM``. That error reply used to escape the listener's task, which ended without a
  word: the L1 went on serving the old value after another client's write.
- **A frame the parser cannot read**, injected on the tracking connection through the
  `FaultProxy` (an error nobody expected): the L1 must stop serving at once, say so once,
  and serve again once tracking is restored.
- **Silence**: the tracking connection blackholed (TCP open, nothing flows), found by its
  unanswered PING; with the default health interval that must fit within the bound.
- **Churn**: the tracking connection killed (``CLIENT KILL ID``) again and again while a
  writer writes and a reader reads: one WARNING for the whole episode, not one per kill.

Asserted in each, by a reader that reads through the L1 while another client writes
increasing versions: no read returns a version older than the newest write that returned
more than `BOUND` seconds before the read began (issue 22's target), and the L1 is used
again afterwards (L1 hits grow).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from aiocacheguard import Cache, LocalCache, Policy
from aiocacheguard.near import RESTART_PAUSE
from aiocacheguard.testing import FaultProxy, RedisClusterServer, RedisServer

from ..helpers import denied_user, library_tasks, wait_until

#: The staleness bound: a read may miss a write for at most this many seconds.
BOUND = 1.0
#: The listeners' health interval in these tests (the default is 1 s).
HEALTH = 0.25
POLICY = Policy(ttl=60.0)


class Timeline:
    """Writes of increasing versions of one key, and every read checked against them."""

    def __init__(self, writer: Cache, reader: Cache, key: str) -> None:
        self.writer, self.reader, self.key = writer, reader, key
        self.written: list[tuple[float, int]] = []  # (returned at, version)
        self.reads = 0
        self.stale: list[str] = []

    def newest_before(self, moment: float) -> int:
        return max((v for at, v in self.written if at <= moment - BOUND), default=-1)

    async def write(self) -> None:
        version = len(self.written)
        await self.writer.set(self.key, version)
        self.written.append((time.monotonic(), version))

    async def read(self) -> None:
        began = time.monotonic()
        got = await self.reader.get(self.key, default=-1)
        self.reads += 1
        floor = self.newest_before(began)
        if got < floor:
            self.stale.append(f"read {got} at +{began - self.written[0][0]:.2f}s, {floor} due")

    async def run(self, seconds: float) -> None:
        """Write every 50 ms and read every 5 ms for ``seconds``."""
        deadline = time.monotonic() + seconds

        async def writes() -> None:
            while time.monotonic() < deadline:
                await self.write()
                await asyncio.sleep(0.05)  # pacing, not synchronisation

        async def reads() -> None:
            while time.monotonic() < deadline:
                await self.read()
                await asyncio.sleep(0.005)

        await asyncio.gather(writes(), reads())
        assert not self.stale, f"{len(self.stale)} stale reads of {self.reads}: {self.stale[:5]}"


def l1_cache(client: redis.Redis, namespace: str) -> Cache:
    cache = Cache(client, namespace=namespace, policy=POLICY, local=LocalCache(ttl=60.0))
    assert cache._near is not None
    cache._near._health_interval = HEALTH  # before the listener starts (in __aenter__)
    return cache


async def pings_denied(admin: redis.Redis, user: str) -> int:
    return sum(
        int(str(entry["count"]))  # ACL LOG groups repeated denials in one entry
        for entry in await admin.acl_log()
        if entry.get("username") == user and entry.get("object") == "ping"
    )


def listener_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "invalidation listener" in r.getMessage()
    ]


@pytest.mark.parametrize("when", ["from the start", "revoked while listening"])
async def test_an_acl_user_without_ping_never_leaves_the_l1_stale(
    client: redis.Redis,
    redis_server: RedisServer,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    async with denied_user(client, "ping") as user:  # PING added back by a case
        if when == "revoked while listening":
            await client.acl_setuser(user, enabled=True, commands=["+ping"])
        limited = redis.Redis(port=redis_server.port, username=user, password="pw")
        try:
            async with (
                l1_cache(limited, namespace) as reader,
                Cache(client, namespace=namespace, policy=POLICY) as writer,
            ):
                assert reader._near is not None
                (listener,) = reader._near.listeners
                timeline = Timeline(writer, reader, "k")
                await timeline.write()
                if when == "revoked while listening":
                    await timeline.run(2 * HEALTH)  # PINGs answered: nothing to see
                    await client.acl_setuser(user, enabled=True, commands=["-ping"])
                for denials in (1, 2):
                    # Quiet until the listener's health PING is refused: that used to end it.
                    async with asyncio.timeout(5):
                        while await pings_denied(client, user) < denials:
                            await asyncio.sleep(0.02)
                    hits = reader.statistics().local_hits
                    await timeline.run(3 * BOUND)
                    assert reader.statistics().local_hits > hits, "the L1 was not used"
                assert listener.listening and listener.lost == 0
                assert reader.statistics().local_bypassed == 0
        finally:
            await limited.aclose()
    said = listener_warnings(caplog)
    assert len(said) == 1 and "PING" in said[0], said
    assert not library_tasks()


async def tracking_connection(proxy: FaultProxy, direct: redis.Redis, client_id: int) -> int:
    """The proxy's id of the connection whose Redis client id is ``client_id``."""
    (info,) = [c for c in await direct.client_list() if int(c["id"]) == client_id]
    port = int(info["addr"].rsplit(":", 1)[1])
    (connection,) = [c for c, p in proxy.connections.items() if p == port]
    return connection


async def test_a_listener_ended_by_an_unexpected_error_bypasses_the_l1_and_heals(
    client: redis.Redis,
    redis_server: RedisServer,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    async with FaultProxy(redis_server.port) as proxy:
        through = redis.Redis(port=proxy.port)
        try:
            async with (
                l1_cache(through, namespace) as reader,
                Cache(client, namespace=namespace, policy=POLICY) as writer,
            ):
                near = reader._near
                assert near is not None
                (listener,) = near.listeners
                timeline = Timeline(writer, reader, "k")
                await timeline.write()
                await timeline.run(2 * HEALTH)
                assert near.serving and listener.client_id is not None
                # A frame no parser reads (RESP has no '%' type in RESP2): an error nobody
                # expected, which used to end the listener's task with the L1 still serving.
                connection = await tracking_connection(proxy, client, listener.client_id)
                proxy.inject(b"%garbage\r\n", connection=connection)
                await wait_until(lambda: not near.serving, within=1.0)  # at once
                assert reader.statistics().local_bypassed == 1
                await timeline.run(3 * BOUND)
                # Healed by itself: tracking again, and the L1 serves again.
                async with asyncio.timeout(5):
                    await listener.wait_listening()
                assert listener.unexpected == 1 and listener.restored == 2
                hits = reader.statistics().local_hits
                await timeline.run(2 * HEALTH)
                assert reader.statistics().local_hits > hits
        finally:
            await through.aclose()
    said = listener_warnings(caplog)
    assert len(said) == 1 and "failed (" in said[0], said
    assert not library_tasks()


async def test_a_silent_tracking_connection_never_leaves_the_l1_stale_past_the_bound(
    client: redis.Redis, redis_server: RedisServer, namespace: str
) -> None:
    # The tracking connection freezes (TCP open, nothing flows): no error ever comes, only
    # the unanswered PING shows it, after two health intervals. With the library's default
    # interval that must stay within the bound.
    async with FaultProxy(redis_server.port) as proxy:
        through = redis.Redis(port=proxy.port)
        try:
            cache = Cache(through, namespace=namespace, policy=POLICY, local=LocalCache(ttl=60.0))
            async with (
                cache as reader,
                Cache(client, namespace=namespace, policy=POLICY) as writer,
            ):
                near = reader._near
                assert near is not None
                (listener,) = near.listeners
                timeline = Timeline(writer, reader, "k")
                await timeline.write()
                await timeline.run(0.5)
                assert listener.client_id is not None
                proxy.blackhole(
                    connection=await tracking_connection(proxy, client, listener.client_id)
                )
                await timeline.run(3 * BOUND)
                assert listener.lost == 1 and reader.statistics().local_bypassed == 1
                async with asyncio.timeout(5):
                    await listener.wait_listening()
                hits = reader.statistics().local_hits
                await timeline.run(0.5)
                assert reader.statistics().local_hits > hits
        finally:
            await through.aclose()
    assert not library_tasks()


async def test_a_listener_killed_again_and_again_is_said_once_and_never_stale(
    client: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")
    kills = 20
    async with (
        l1_cache(client, namespace) as reader,
        Cache(client, namespace=namespace, policy=POLICY) as writer,
    ):
        near = reader._near
        assert near is not None
        (listener,) = near.listeners
        timeline = Timeline(writer, reader, "k")
        await timeline.write()

        async def churn() -> None:
            for n in range(kills):
                async with asyncio.timeout(5):
                    while listener.restored < n + 1 or listener.client_id is None:
                        await asyncio.sleep(0.005)
                await client.execute_command("CLIENT", "KILL", "ID", listener.client_id)  # type: ignore[no-untyped-call]
                await wait_until(lambda n=n: listener.lost > n)  # type: ignore[misc]
                await asyncio.sleep(0.05)  # pacing: let the reader see it restored

        await asyncio.gather(churn(), timeline.run(2.0))
        await wait_until(lambda: listener.restored == kills + 1)
        assert listener.lost == kills
        assert reader.statistics().local_bypassed == kills
        hits = reader.statistics().local_hits
        await timeline.run(2 * HEALTH)
        assert reader.statistics().local_hits > hits
    said = listener_warnings(caplog)
    assert len(said) == 1, f"{len(said)} warnings for one episode of {kills} losses: {said[:3]}"
    assert not library_tasks()


async def test_a_cluster_l1_whose_watch_is_ended_from_outside_bypasses_and_starts_over(
    redis_cluster: RedisClusterServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # On a cluster the L1's starter watches the primaries until aclose(); if it ends (here a
    # cancellation nobody asked for), slots that move go unnoticed: the L1 must stop serving
    # at once, say so, and start over.
    caplog.set_level(logging.WARNING, "aiocacheguard")
    host, port = redis_cluster.startup_nodes[0]
    client = RedisCluster(host=host, port=port)
    try:
        cache = Cache(client, namespace=namespace, policy=POLICY, local=LocalCache(ttl=60.0))
        async with cache:
            near = cache._near
            assert near is not None and near.serving
            await cache.set("k", 1)
            assert await cache.get("k") == 1
            before = list(near.listeners)
            starter = near._starting
            assert starter is not None
            starter.cancel()
            await wait_until(lambda: not near.serving, within=1.0)  # at once
            assert cache.statistics().local_bypassed == 1
            # Started over: new listeners, and the L1 serves again.
            await wait_until(lambda: near.serving, within=RESTART_PAUSE + 10)
            assert not set(near.listeners) & set(before)
            hits = cache.statistics().local_hits
            for _ in range(3):
                assert await cache.get("k") == 1
            assert cache.statistics().local_hits > hits
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(said) == 1 and "started over" in said[0], said
    finally:
        await client.aclose()
    assert not library_tasks()
