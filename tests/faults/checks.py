"""
What "nothing lost" means after a fault, checked the same way in every family: no rebuild
lock of the namespace left in Redis, no fill channel still subscribed, no library task left
running, no connection of the test's clients left open, and the newest value in Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aiocacheguard import Cache

from ..helpers import library_tasks


def through(port: int, name: str, **kwargs: Any) -> redis.Redis:
    """
    A client of the Cache under test: named (so `CLIENT LIST` finds its connections) and
    without redis-py's retries, so each fault costs one budget, as `Cache.from_url` does.
    """
    return redis.Redis(port=port, client_name=name, retry=Retry(NoBackoff(), 0), **kwargs)


async def locks_left(direct: redis.Redis, namespace: str) -> list[bytes]:
    return [key async for key in direct.scan_iter(match=f"{{{namespace}:*}}:lock")]


async def channels_left(direct: redis.Redis, namespace: str) -> list[bytes]:
    return cast("list[bytes]", await direct.pubsub_channels(f"{{{namespace}:*}}:fill"))


async def connections_left(direct: redis.Redis, name: str) -> int:
    return sum(c.get("name") == name for c in await direct.client_list())


async def assert_nothing_left(
    direct: redis.Redis, namespace: str, *, name: str | None = None, within: float = 5.0
) -> None:
    """
    After the Caches were closed: no lock, no subscription, no task and (for a named client,
    closed too) no connection. Locks released in the background and connections closing
    get ``within`` seconds to go.
    """
    deadline = asyncio.get_running_loop().time() + within
    while True:
        left = {
            "locks": await locks_left(direct, namespace),
            "channels": await channels_left(direct, namespace),
            "tasks": sorted(t.get_name() for t in library_tasks()),
            "connections": 0 if name is None else await connections_left(direct, name),
        }
        if not any(left.values()):
            return
        if asyncio.get_running_loop().time() >= deadline:
            shown = {kind: v[:5] if isinstance(v, list) else v for kind, v in left.items()}
            counts = {kind: len(v) if isinstance(v, list) else v for kind, v in left.items()}
            raise AssertionError(f"left after {within}s: {counts}, e.g. {shown}")
        await asyncio.sleep(0.02)


async def stored(cache: Cache, key: str) -> Any:
    """What Redis holds for ``key`` now (read by a fresh read, not a flight)."""
    return await cache.get(key, default="<absent>")
