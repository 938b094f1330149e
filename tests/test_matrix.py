"""Each cell of the nox matrix runs on what it says: a cell that silently fell back to the
default loop or server would pass without testing anything new."""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as redis

from aiocacheguard.testing import RedisServer


async def test_the_event_loop_is_the_cells() -> None:
    loop = type(asyncio.get_running_loop())
    if os.environ.get("AIOCACHEGUARD_LOOP") == "uvloop":
        assert loop.__module__.startswith("uvloop"), loop
    else:
        assert loop.__module__.startswith("asyncio"), loop


async def test_the_server_is_the_cells(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    expected = os.environ.get("AIOCACHEGUARD_EXPECT_SERVER")
    if expected == "valkey":
        assert str(info.get("server_name")) == "valkey", info
    elif expected == "redis-6.2":
        assert str(info["redis_version"]).startswith("6.2."), info
        assert "server_name" not in info or info["server_name"] != "valkey"
    else:
        assert "server_name" not in info or info["server_name"] != "valkey"
