"""
Fixtures: one throwaway redis-server per test session, started through aiocacheguard.server on a
free loopback port. The machine's own Redis on 6379 is never touched. Each test gets its own
namespace, so no test flushes or sees another's keys.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy, ServerNotFoundError
from aiocacheguard.server import RedisCluster, RedisSentinel, RedisServer

D = TypeVar("D", RedisServer, RedisCluster, RedisSentinel)


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


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    for server in started(RedisServer()):
        assert server.port != 6379
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    yield from started(RedisCluster())


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    yield from started(RedisSentinel())


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A default client, as a user would create it (pool defaults and all)."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def library_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("aiocacheguard-")}


@pytest.fixture
async def cache(client: redis.Redis, namespace: str) -> AsyncIterator[Cache]:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        yield cache
    assert not library_tasks(), "aclose() left library tasks behind"


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
