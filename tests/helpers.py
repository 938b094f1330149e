"""
Helpers the tests share: deployments for fixtures, gated loaders, a hand-moved clock, an event
recorder, polling, server counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
import redis.asyncio as redis

from aiocacheguard import Event
from aiocacheguard.testing import (
    RedisClusterServer,
    RedisSentinelServer,
    RedisServer,
    ServerNotFoundError,
)

D = TypeVar("D", RedisServer, RedisClusterServer, RedisSentinelServer)


def started(deployment: D) -> Iterator[D]:
    """Start a throwaway deployment for the session; no binary fails the run, never skips."""
    try:
        deployment.start()
    except ServerNotFoundError as exc:
        pytest.fail(f"the tests need a redis-server binary: {exc}", pytrace=False)
    try:
        yield deployment
    finally:
        deployment.stop()


def library_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("aiocacheguard-")}


class GatedLoader:
    """A loader that counts its calls and blocks until released (then fails, if told to)."""

    def __init__(self, value: object = "v", error: BaseException | None = None) -> None:
        self.value = value
        self.error = error
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self) -> object:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.error is not None:
            raise self.error
        return self.value


class Clock:
    """A wall clock the test moves by hand (expiry decisions only; Redis TTLs stay real)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Events:
    """A Cache's ``hook``: records its events; `wait_for` waits until some of a kind arrive."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.seen.append(event)
        self._changed.set()

    def kinds(self) -> list[str]:
        return [event.kind for event in self.seen]

    def count(self, kind: str) -> int:
        return sum(event.kind == kind for event in self.seen)

    async def wait_for(self, kind: str, count: int = 1, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while self.count(kind) < count:
                self._changed.clear()
                await self._changed.wait()


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """
    Wait for a library-internal state that has no event of its own (e.g. "the other Cache is
    parked on the fill channel"), checking every millisecond, failing after ``within`` s.
    """
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.001)


async def command_calls(client: redis.Redis, *commands: str) -> int:
    """How many times the server ran these commands (from INFO commandstats)."""
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in commands)


@contextlib.asynccontextmanager
async def denied_user(admin: redis.Redis, *denied: str) -> AsyncIterator[str]:
    """
    The name of a throwaway ACL user (password ``pw``) allowed everything but the ``denied``
    commands (e.g. ``"client|tracking"``; Redis 7 checks the ACL of commands called from Lua
    too); deleted afterwards.
    """
    if any("|" in command for command in denied):
        version = str((await admin.info("server"))["redis_version"])
        if int(version.split(".")[0]) < 7:
            pytest.skip(f"Redis {version}'s ACL cannot deny one subcommand (Redis 7 can)")
    user = f"limited-{uuid.uuid4().hex[:8]}"
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", *(f"-{command}" for command in denied)],
    )
    try:
        yield user
    finally:
        await admin.acl_deluser(user)


@contextlib.asynccontextmanager
async def limited_client(
    admin: redis.Redis, server: RedisServer, *denied: str
) -> AsyncIterator[redis.Redis]:
    """A client of a `denied_user`."""
    async with denied_user(admin, *denied) as user:
        limited = redis.Redis(host=server.host, port=server.port, username=user, password="pw")
        try:
            yield limited
        finally:
            await limited.aclose()
