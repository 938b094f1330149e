"""
A hot key expires while 10,000 requests want it: how many times does the database get asked?

Starts a throwaway redis-server (no Redis needed on the machine), fires 10,000 concurrent
``get_or_load`` calls at one missing key, and prints the loader calls and the wall time.

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisServer

CALLERS = 10_000


async def main(port: int) -> None:
    client = redis.Redis(port=port)
    database_queries = 0

    async def load_leaderboard() -> list[dict[str, object]]:
        nonlocal database_queries
        database_queries += 1
        await asyncio.sleep(0.05)  # the query
        return [{"player": "ada", "score": 42}]

    async with Cache(client, namespace="quickstart", policy=Policy(ttl=30.0)) as cache:
        started = time.perf_counter()
        boards = await asyncio.gather(
            *(cache.get_or_load("leaderboard", load_leaderboard) for _ in range(CALLERS))
        )
        elapsed = time.perf_counter() - started
        assert all(board == boards[0] for board in boards)
        print(f"{CALLERS} concurrent callers, {database_queries} database query, {elapsed:.2f} s")
        print(cache.statistics())
    await client.aclose()


if __name__ == "__main__":
    with RedisServer() as server:
        asyncio.run(main(server.port))
