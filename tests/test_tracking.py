"""
The invalidation listener (aiocacheguard.tracking) against a real redis-server: what other
clients change under the prefix reaches the callback, a killed connection is reported and
replaced, and, at the message level, why the listener pins RESP2.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from aiocacheguard.backend import TrackingConnection
from aiocacheguard.guards.local import LocalCache, LocalStore
from aiocacheguard.testing import FaultProxy, RedisClusterServer, RedisSentinelServer, RedisServer
from aiocacheguard.tracking import INVALIDATION_CHANNEL, REFUSED_RETRY, InvalidationListener

from .helpers import limited_client, wait_until


class Recorder:
    """The listener's callbacks: every invalidation and every lost / restored, in order."""

    def __init__(self) -> None:
        self.invalidated: list[bytes | None] = []
        self.log: list[str] = []

    def on_invalidate(self, keys: Sequence[bytes] | None) -> None:
        if keys is None:
            self.invalidated.append(None)
        else:
            self.invalidated.extend(keys)

    def on_lost(self) -> None:
        self.log.append("lost")

    def on_restored(self) -> None:
        self.log.append("restored")

    async def wait_for(self, key: bytes | None, count: int = 1) -> None:
        await wait_until(lambda: self.invalidated.count(key) >= count, within=5.0)


@pytest.fixture
def prefix(namespace: str) -> bytes:
    return b"{%s:" % namespace.encode()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def listener(
    client: redis.Redis, prefix: bytes, recorder: Recorder
) -> AsyncIterator[InvalidationListener]:
    listener = InvalidationListener(
        client,
        prefix,
        on_invalidate=recorder.on_invalidate,
        on_lost=recorder.on_lost,
        on_restored=recorder.on_restored,
        health_interval=0.5,
    )
    async with listener:
        async with asyncio.timeout(5):
            await listener.wait_listening()
        yield listener


async def test_the_listener_speaks_resp2_even_when_the_client_speaks_resp3(
    client: redis.Redis, listener: InvalidationListener, prefix: bytes
) -> None:
    clients = await client.client_list()
    mine = next(c for c in clients if int(c["id"]) == listener.client_id)
    if "resp" not in mine:
        pytest.skip("CLIENT LIST names each connection's protocol from Redis 7 on")
    assert mine["resp"] == "2"
    assert "t" in mine["flags"] and "P" in mine["flags"]  # tracking, pub/sub
    assert int(mine["redir"]) == listener.client_id
    assert any(c["resp"] == "3" for c in clients)  # the user's client: redis-py 8's default


async def test_set_del_and_expiry_by_another_client_are_announced(
    client: redis.Redis, listener: InvalidationListener, prefix: bytes, recorder: Recorder
) -> None:
    key = prefix + b"k}"
    await client.set(key, b"v")
    await recorder.wait_for(key)
    await client.delete(key)
    await recorder.wait_for(key, 2)
    await client.set(key, b"v", px=30)
    await recorder.wait_for(key, 3)
    # The expiry itself is announced whichever way Redis finds it: its active expiry cycle
    # (which samples keys with a TTL, slow on a server holding many), or a read after the
    # TTL (lazy expiry), which EXISTS makes here so the test does not wait on the sampling.
    await asyncio.sleep(0.05)
    assert await client.exists(key) == 0
    await recorder.wait_for(key, 4)
    await client.set(key, b"v")
    await client.expire(key, 0)  # EXPIRE in the past deletes at once
    await recorder.wait_for(key, 6)
    assert recorder.log == ["restored"]


async def test_a_write_outside_the_prefix_is_not_announced(
    client: redis.Redis, listener: InvalidationListener, prefix: bytes, recorder: Recorder
) -> None:
    outside = b"{other-" + prefix[1:] + b"k}"
    await client.set(outside, b"v")
    marker = prefix + b"marker}"
    await client.set(marker, b"v")  # announced after the write before it, on one connection
    await recorder.wait_for(marker)
    assert recorder.invalidated == [marker]


async def test_flushdb_is_announced_as_flush_everything(
    redis_server: RedisServer, prefix: bytes, recorder: Recorder
) -> None:
    # Database 9, so flushing it wipes no other test's keys. Tracking ignores databases: a
    # flush of any database is announced to every tracking client (harmless to an L1).
    other_db = redis.Redis(host=redis_server.host, port=redis_server.port, db=9)
    try:
        async with InvalidationListener(
            other_db, prefix, on_invalidate=recorder.on_invalidate, health_interval=0.5
        ) as listener:
            async with asyncio.timeout(5):
                await listener.wait_listening()
            await other_db.set(prefix + b"k}", b"v")
            await other_db.flushdb()
            await recorder.wait_for(None)
            assert recorder.invalidated == [prefix + b"k}", None]
    finally:
        await other_db.aclose()


async def test_a_killed_connection_is_lost_restored_and_invalidations_flow_again(
    client: redis.Redis, listener: InvalidationListener, prefix: bytes, recorder: Recorder
) -> None:
    first_id = listener.client_id
    killed = await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    assert killed >= 1
    await wait_until(lambda: recorder.log == ["restored", "lost", "restored"], within=5.0)
    assert listener.listening
    assert listener.client_id not in (None, first_id)
    key = prefix + b"after}"
    await client.set(key, b"v")
    await recorder.wait_for(key)


async def test_a_server_that_stops_answering_is_lost_within_the_health_interval(
    redis_server: RedisServer, prefix: bytes, recorder: Recorder
) -> None:
    # A connection that stays open but goes silent (a frozen server, a dropped route):
    # no error arrives, only the unanswered PING shows it.
    from .proxy import DelayProxy

    proxy = DelayProxy(redis_server.port)
    await proxy.start()
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    try:
        async with InvalidationListener(
            client,
            prefix,
            on_invalidate=recorder.on_invalidate,
            on_lost=recorder.on_lost,
            on_restored=recorder.on_restored,
            health_interval=0.2,
        ) as listener:
            async with asyncio.timeout(5):
                await listener.wait_listening()
            proxy.latency = 3.0  # every chunk now takes 3 s each way
            async with asyncio.timeout(2):
                await wait_until(lambda: "lost" in recorder.log)
            assert not listener.listening
            proxy.latency = 0.0  # the route comes back: the listener reconnects through it
            await wait_until(lambda: recorder.log == ["restored", "lost", "restored"])
            key = prefix + b"after}"
            await client.set(key, b"v")
            await recorder.wait_for(key)
    finally:
        await client.aclose()
        await proxy.stop()


async def test_aclose_leaves_no_task_and_no_connection(
    client: redis.Redis, prefix: bytes, recorder: Recorder
) -> None:
    listener = InvalidationListener(client, prefix, on_invalidate=recorder.on_invalidate)
    listener.start()
    async with asyncio.timeout(5):
        await listener.wait_listening()
    client_id = listener.client_id
    await listener.aclose()
    assert not listener.listening
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("aiocacheguard-")]

    async def gone() -> bool:
        return client_id not in {int(c["id"]) for c in await client.client_list()}

    async with asyncio.timeout(2):  # the server notices the closed socket on its next poll
        while not await gone():
            await asyncio.sleep(0.01)


# The RESP3 trap, at the message level. A tracking connection redirects its invalidations to a
# redis-py PubSub subscribed to __redis__:invalidate; another client writes under the prefix.


async def _redirect_to(client: redis.Redis, target_name: str, prefix: bytes) -> redis.Redis:
    """A one-connection client with BCAST tracking redirected to the client named so."""
    target = next(c for c in await client.client_list() if c["name"] == target_name)
    tracker = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
    await tracker.execute_command(  # type: ignore[no-untyped-call]
        "CLIENT", "TRACKING", "ON", "REDIRECT", target["id"], "BCAST", "PREFIX", prefix
    )
    return tracker


async def _messages(pubsub: redis.client.PubSub, within: float) -> list[object]:
    messages: list[object] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (left := deadline - loop.time()) > 0:
        message = await pubsub.get_message(timeout=left)
        if message is not None:
            messages.append(message)
    return messages


@pytest.mark.parametrize("protocol", [2, 3])
async def test_resp3_pubsub_drops_the_invalidation_resp2_delivers_it(
    redis_server: RedisServer, client: redis.Redis, prefix: bytes, protocol: int
) -> None:
    name = f"listener-resp{protocol}-{prefix[1:-1].decode()}"
    target = redis.Redis(
        host=redis_server.host, port=redis_server.port, protocol=protocol, client_name=name
    )
    pubsub = target.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(INVALIDATION_CHANNEL)
    tracker = await _redirect_to(client, name, prefix)
    try:
        key = prefix + b"k}"
        await client.set(key, b"v")
        messages = await _messages(pubsub, within=0.5)
        if protocol == 2:
            assert messages == [
                {"type": "message", "pattern": None, "channel": INVALIDATION_CHANNEL, "data": [key]}
            ]
        else:
            # Redis sent a RESP3 push (">2 invalidate [key]"); redis-py's parser has no
            # invalidation handler, so the PubSub never sees it.
            assert messages == []
    finally:
        await tracker.aclose()
        await pubsub.aclose()
        await target.aclose()


async def test_resp3_invalidations_do_arrive_as_push_frames(
    redis_server: RedisServer, client: redis.Redis, prefix: bytes
) -> None:
    # The other half of the proof: the same RESP3 connection with a push handler installed
    # receives them, so the silence above is redis-py dropping them, not Redis not sending.
    name = f"listener-push-{prefix[1:-1].decode()}"
    target = redis.Redis(
        host=redis_server.host, port=redis_server.port, protocol=3, client_name=name
    )
    pubsub = target.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(INVALIDATION_CHANNEL)
    pushes: list[object] = []

    async def handler(response: object) -> None:
        pushes.append(response)

    # redis-py 8.1's public hook for invalidation pushes is on the parser of a connection.
    cast(Any, pubsub).connection._parser.set_invalidation_push_handler(handler)
    tracker = await _redirect_to(client, name, prefix)
    try:
        key = prefix + b"k}"
        await client.set(key, b"v")
        assert await _messages(pubsub, within=0.5) == []
        assert pushes == [[b"invalidate", [key]]]
    finally:
        await tracker.aclose()
        await pubsub.aclose()
        await target.aclose()


async def test_a_refusal_to_track_keeps_the_listener_off_with_its_error_until_lifted(
    redis_server: RedisServer, client: redis.Redis, namespace: str, prefix: bytes
) -> None:
    async with limited_client(client, redis_server, "client|tracking") as limited:
        recorder = Recorder()
        listener = InvalidationListener(
            limited,
            prefix,
            on_invalidate=recorder.on_invalidate,
            on_restored=recorder.on_restored,
            reconnect_delay=(0.01, 0.05),
        )
        try:
            listener.start()
            await wait_until(lambda: listener.error is not None)
            assert "tracking" in str(listener.error).lower()
            assert not listener.listening and recorder.log == []
            # Asked again after a pause: once the ACL allows it, tracking comes back.
            user = await limited.acl_whoami()
            user = user.decode() if isinstance(user, bytes) else user
            await client.acl_setuser(user, enabled=True, commands=["+client|tracking"])
            async with asyncio.timeout(REFUSED_RETRY + 5):
                await listener.wait_listening()
            assert listener.error is None and recorder.log == ["restored"]
        finally:
            await listener.aclose()


async def test_a_task_ended_from_outside_bypasses_at_once_and_restarts(
    client: redis.Redis, listener: InvalidationListener, prefix: bytes, recorder: Recorder
) -> None:
    # Not a path the listener takes by itself: any end of its task (here a cancellation
    # nobody asked for) must call on_lost at once and start listening again.
    task = listener._task
    assert task is not None
    task.cancel()
    await wait_until(lambda: recorder.log == ["restored", "lost"], within=1.0)
    await wait_until(lambda: recorder.log == ["restored", "lost", "restored"], within=5.0)
    assert listener.lost == 1 and listener.unexpected == 1 and listener._task is not task
    key = prefix + b"after}"
    await client.set(key, b"v")
    await recorder.wait_for(key)


async def test_sentinel_the_listener_finds_the_primary_through_the_sentinels(
    redis_sentinel: RedisSentinelServer, prefix: bytes
) -> None:
    sentinel = Sentinel(redis_sentinel.sentinels)
    primary = sentinel.master_for(redis_sentinel.service)
    recorder = Recorder()
    try:
        async with InvalidationListener(
            primary, prefix, on_invalidate=recorder.on_invalidate, health_interval=0.5
        ) as listener:
            async with asyncio.timeout(5):
                await listener.wait_listening()
            key = prefix + b"k}"
            await primary.set(key, b"v")
            await recorder.wait_for(key)
    finally:
        await primary.aclose()
        for server in sentinel.sentinels:
            await server.aclose()


async def test_cluster_one_listener_a_primary_sees_the_writes_of_its_slots(
    redis_cluster: RedisClusterServer, prefix: bytes
) -> None:
    # What a cluster L1 would build on: redis-py's RedisCluster has no tracking support, but
    # its primaries' connection settings open one RESP2 listener each. Keys of one hash tag
    # live on one primary; only that primary's listener hears of them.
    cluster = RedisCluster(host=redis_cluster.host, port=redis_cluster.startup_nodes[0][1])
    await cluster.initialize()
    recorders: dict[str, Recorder] = {}
    listeners: list[InvalidationListener] = []
    try:
        primaries = cluster.get_primaries()
        factories = TrackingConnection.factories(cluster)
        assert len(factories) == len(primaries) == 3
        for node, factory in zip(primaries, factories, strict=True):
            recorder = recorders[node.name] = Recorder()
            listener = InvalidationListener(
                None, b"{", on_invalidate=recorder.on_invalidate, connection_factory=factory
            )
            listener.start()
            listeners.append(listener)
        async with asyncio.timeout(5):
            for listener in listeners:
                await listener.wait_listening()
        key = prefix + b"k}"
        await cluster.set(key, b"v")
        home = cluster.get_node_from_key(key.decode())
        assert home is not None
        owner = home.name
        await recorders[owner].wait_for(key)
        assert all(key not in r.invalidated for name, r in recorders.items() if name != owner)
    finally:
        for listener in listeners:
            await listener.aclose()
        await cluster.aclose()


async def test_with_a_store_a_write_racing_a_read_leaves_no_stale_entry(
    client: redis.Redis, prefix: bytes
) -> None:
    # The two parts wired as the Cache will wire them: a read that returned the old value,
    # overtaken by the invalidation of a write, is not kept; losing the listener bypasses.
    store: LocalStore[bytes, bytes] = LocalStore(LocalCache())
    store.bypass()  # until the listener is listening

    def on_invalidate(keys: Sequence[bytes] | None) -> None:
        if keys is None:
            store.clear()
        else:
            for key in keys:
                store.invalidate(key)

    key = prefix + b"k}"

    async def read() -> bytes:
        value = await client.get(key)
        assert isinstance(value, bytes)
        return value

    await client.set(key, b"old")
    async with InvalidationListener(
        client,
        prefix,
        on_invalidate=on_invalidate,
        on_lost=store.bypass,
        on_restored=store.resume,
        health_interval=0.5,
    ) as listener:
        async with asyncio.timeout(5):
            await listener.wait_listening()
        token = store.begin_fill(key)
        old = await read()  # the read...
        seen = store.invalidations
        await client.set(key, b"new")  # ...overtaken by another client's write
        await wait_until(lambda: store.invalidations > seen)
        assert old == b"old"
        assert not store.finish_fill(key, token, old)
        token = store.begin_fill(key)
        assert store.finish_fill(key, token, await read())
        assert store.get(key) == b"new"

        await client.execute_command("CLIENT", "KILL", "ID", listener.client_id)  # type: ignore[no-untyped-call]
        await wait_until(lambda: listener.restored == 2)
        assert listener.lost == 1 and not store.bypassing
        assert store.get(key) is None  # flushed when lost: writes may have been missed
        token = store.begin_fill(key)
        assert store.finish_fill(key, token, await read())
        assert store.get(key) == b"new"


async def test_an_unreachable_redis_is_said_once_not_once_per_attempt(
    redis_server: RedisServer, prefix: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    async with FaultProxy(redis_server.port) as proxy:
        proxy.refuse()
        client = redis.Redis(port=proxy.port)
        listener = InvalidationListener(
            client, prefix, on_invalidate=recorder.on_invalidate, reconnect_delay=(0.01, 0.02)
        )
        try:
            with caplog.at_level(logging.DEBUG, logger="aiocacheguard"):
                listener.start()
                await wait_until(
                    lambda: sum("cannot connect" in r.getMessage() for r in caplog.records) >= 5
                )
                await proxy.unrefuse()
                async with asyncio.timeout(5):
                    await listener.wait_listening()
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert sum("cannot connect" in m for m in warnings) == 1
            # The recovery is said too, at INFO: the outage was the warning.
            assert any(
                "connected after" in r.getMessage() and r.levelno == logging.INFO
                for r in caplog.records
            )
        finally:
            await listener.aclose()
            await client.aclose()


async def test_aclose_does_not_swallow_the_callers_cancellation(
    client: redis.Redis, prefix: bytes
) -> None:
    listener = InvalidationListener(client, prefix, on_invalidate=lambda keys: None)
    listener.start()
    async with asyncio.timeout(5):
        await listener.wait_listening()
    went_on = False

    async def closer() -> None:
        nonlocal went_on
        await listener.aclose()
        went_on = True

    task = asyncio.create_task(closer())
    await asyncio.sleep(0)  # closer is inside aclose(), waiting for the listener
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not went_on
    await listener.aclose()
