"""
(j) Missing permissions: real ACL users on the suite's own server, each lacking one thing a
Cache needs. A missing permission is a configuration error, not an outage: the caller gets
`PermissionDeniedError` / `AuthenticationError` (or the loader's value from ``get_or_load``),
the circuit breaker stays closed, ``permission_errors`` counts it and ONE warning per episode
names it. Each test failed on the code before this fix (see tests/faults/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from aiocacheguard import (
    AuthenticationError,
    BackendUnavailable,
    Cache,
    LocalCache,
    PermissionDeniedError,
    Policy,
    permissions,
)
from aiocacheguard.backend import RedisBackend
from aiocacheguard.guards.notify import FillNotifier
from aiocacheguard.testing import RedisServer

from ..helpers import GatedLoader, library_tasks, wait_until

#: Everything a Cache needs of a key pattern and of channels, minus what a test takes away.
EVERYTHING = ("~*", "&*", "+@all")


@contextlib.asynccontextmanager
async def acl_client(
    admin: redis.Redis, server: RedisServer, *rules: str
) -> AsyncIterator[redis.Redis]:
    """A client of a throwaway ACL user with ``rules`` (``ACL SETUSER`` syntax)."""
    user = f"acl-{uuid.uuid4().hex[:8]}"
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", user, "reset", "on", ">pw", *rules
    )
    client = redis.Redis(port=server.port, username=user, password="pw")
    try:
        yield client
    finally:
        await client.aclose()
        await admin.execute_command("ACL", "DELUSER", user)  # type: ignore[no-untyped-call]


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


@pytest.fixture(autouse=True)
def _warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "aiocacheguard")


async def load_each(cache: Cache, keys: list[str]) -> list[object]:
    async def value(key: str) -> str:
        return f"loaded {key}"

    return [await cache.get_or_load(k, lambda k=k: value(k)) for k in keys]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("missing", "rules"),
    [
        ("evalsha", (*EVERYTHING, "-evalsha")),
        ("script|load", (*EVERYTHING, "-script|load")),
        ("key access", ("~{elsewhere:*", "&*", "+@all")),
    ],
)
async def test_a_missing_permission_is_said_once_and_never_trips_the_breaker(
    redis_server: RedisServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    missing: str,
    rules: tuple[str, ...],
) -> None:
    """
    Before: ``get_or_load`` returned the loader's value and cached nothing, counted only in
    ``redis_errors``, no log line; ``set`` raised a bare `BackendError`.
    """
    if missing == "script|load":
        await client.script_flush()  # loaded by earlier tests, they would run
    async with (
        acl_client(client, redis_server, *rules) as limited,
        Cache(limited, namespace=namespace, policy=Policy(ttl=30.0)) as cache,
    ):
        keys = [f"k{i}" for i in range(30)]
        assert await load_each(cache, keys) == [f"loaded {k}" for k in keys]
        with pytest.raises(PermissionDeniedError, match="aiocacheguard acl"):
            await cache.set("k", 1)
        stats = cache.statistics()
        assert stats.permission_errors >= 31
        assert stats.breaker_opened == 0 and stats.short_circuited == 0
        assert cache.breaker is not None and cache.breaker.state.value == "closed"
        said = warnings_of(caplog, "")
        assert len(said) == 1, said  # one episode, one line: the start check's
        assert ("~{" if missing == "key access" else f"+{missing}") in said[0]


async def test_a_refused_publish_does_not_fail_the_write(
    redis_server: RedisServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    Before: the FILL script ran SET, then its PUBLISH was refused, and ``set()`` raised
    although the value was in Redis (a partial write reported as a failure); ``delete()``
    too, after its UNLINK.
    """
    rules = ("~*", "&elsewhere:*", "+@all")  # no channel of the namespace
    policy = Policy(ttl=30.0, lock_ttl=0.5)
    async with (
        acl_client(client, redis_server, *rules) as limited,
        Cache(limited, namespace=namespace, policy=policy) as cache,
        Cache(client, namespace=namespace, policy=policy) as other,
    ):
        await cache.set("k", "written")
        assert await other.get("k") == "written"
        # A fill whose notice is refused: a waiter elsewhere gets it at its lease re-check.
        holder_loader = GatedLoader("filled")
        holding = asyncio.create_task(cache.get_or_load("f", holder_loader))
        await holder_loader.started.wait()
        own = GatedLoader("own")
        own.release.set()
        waiting = asyncio.create_task(other.get_or_load("f", own))
        await wait_until(lambda: other.statistics().lock_waits > 0)
        holder_loader.release.set()
        assert await holding == "filled"
        async with asyncio.timeout(3):
            assert await waiting == "filled"
        assert own.calls == 0
        await cache.set("d", 1)
        lock = cache.keys.lock(cache.keys.value("d"))
        await client.set(lock, "someone", px=5000)  # a rebuild in progress: delete drops it
        assert await cache.delete("d") is True
        assert await client.exists(cache.keys.value("d"), lock) == 0
        stats = cache.statistics()
        # The start check's finding, then 2 sets, a fill and a delete: each notice refused.
        assert stats.permission_errors == 1 + 4
        assert stats.lock_lost == 0 and stats.unwritten_loads == 0
        said = warnings_of(caplog, "")
        assert len(said) == 1, said  # the start check's; the refusals are the same episode


async def test_a_wrong_password_is_not_an_outage(
    redis_server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """
    Before: `BackendUnavailable` ("Redis is unreachable") and the breaker opened. (A client
    with redis-py's default retries retries the refusal for about 4 s, which the Cache cannot
    tell from a slow Redis: `Cache.from_url` turns them off, and the start check says it.)
    """
    secret = "s3cret-never-printed"
    url = f"redis://nobody:{secret}@127.0.0.1:{redis_server.port}/0"
    async with Cache.from_url(url, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        for _ in range(20):
            with pytest.raises(AuthenticationError) as raised:
                await cache.get("k")
            assert not isinstance(raised.value, BackendUnavailable)
            assert secret not in str(raised.value)
        keys = [f"k{i}" for i in range(10)]
        assert await load_each(cache, keys) == [f"loaded {k}" for k in keys]
        stats = cache.statistics()
        assert stats.breaker_opened == 0 and stats.short_circuited == 0
        assert stats.permission_errors >= 30
        said = warnings_of(caplog, "credentials")
        assert len(said) == 1, said
        assert secret not in caplog.text


async def test_subscriptions_stay_bounded_without_unsubscribe(
    redis_server: RedisServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: every channel ever waited on stayed subscribed (200 after 200 waits)."""
    async with acl_client(client, redis_server, *EVERYTHING, "-unsubscribe") as limited:
        backend = RedisBackend(limited, command_timeout=1.0)
        notifier = FillNotifier()
        notifier.bind(backend.subscriber(notifier.deliver))
        pattern = f"{{{namespace}:*"
        try:
            for i in range(200):
                async with notifier.listen(f"{{{namespace}:{i}}}:fill".encode()) as signal:
                    assert signal.live
                await notifier.aclose()  # its UNSUBSCRIBE (or the drop) has been sent
            most = len(await client.pubsub_channels(pattern))
            assert most <= 2, most
            # Notifications still work: a fill reaches a listener.
            channel = f"{{{namespace}:live}}:fill".encode()
            async with notifier.listen(channel) as signal:
                await client.publish(channel, b"hello")
                assert await signal.wait_notified(2.0)  # (its body is never read: a wake-up)
            assert notifier.fallbacks == 0
            assert backend.permission_errors >= 1
            assert len(warnings_of(caplog, "unsubscribe")) == 1
        finally:
            await notifier.aclose()
            await backend.aclose()
        assert not library_tasks()


@pytest.mark.parametrize("local", [False, True])
async def test_the_start_says_in_one_warning_what_is_missing(
    redis_server: RedisServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    local: bool,
) -> None:
    """Before: nothing was checked; each missing permission showed only when first used."""
    rules = ("~*", "&*", "+@all", "-evalsha", "-publish", "-client|tracking")
    async with acl_client(client, redis_server, *rules) as limited:
        l1 = LocalCache(ttl=5.0) if local else None
        async with Cache(limited, namespace=namespace, policy=Policy(ttl=30.0), local=l1) as c:
            said = warnings_of(caplog, "ACL DRYRUN")
            assert len(said) == 1, said
            assert "+evalsha +publish" in said[0]
            assert ("+client|tracking" in said[0]) is local
            assert f"aiocacheguard acl --namespace {namespace}" in said[0]
            assert c.statistics().permission_errors == 2 + local


async def test_the_start_is_silent_when_nothing_is_missing_or_it_cannot_ask(
    redis_server: RedisServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The least-privileged user of `aiocacheguard acl` lacks nothing, and may not ask.
    arguments = permissions.setuser(namespace, user="x", password="pw", local=True)
    async with acl_client(client, redis_server, *arguments[5:]) as least:
        local = LocalCache(ttl=5.0)
        async with Cache(least, namespace=namespace, policy=Policy(ttl=30.0), local=local) as c:
            await c.set("k", 1)
            assert await c.get("k") == 1
            assert c.statistics().permission_errors == 0
    # An admin lacks nothing either.
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as c:
        assert c.statistics().permission_errors == 0
    assert not warnings_of(caplog, "")
