"""Fixtures of the fault suite: a `FaultProxy` in front of the session's redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aiocacheguard.testing import FaultProxy, RedisServer


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(redis_server.port) as proxy:
        yield proxy
