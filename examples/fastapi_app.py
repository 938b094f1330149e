"""
A FastAPI service: loaders decorated at module level, the Cache created in the lifespan.

The loaders exist before any Cache does, so they are decorated with a `CacheRef`, which the
lifespan binds to the Cache it creates. A new client and Cache per lifespan: a Cache is done
for after ``aclose()``, and a test client runs the lifespan again, in an event loop of its own,
each time it is entered. Handlers that call the Cache itself get it from a dependency.

The "database" is in memory and counts the queries that reach it; ``/stats`` shows them beside
the Cache's counters. ``tests/test_fastapi.py`` runs this app through FastAPI's test client.

Run it (needs ``pip install fastapi uvicorn`` and a Redis at ``REDIS_URL``)::

    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn fastapi_app:app --app-dir examples
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from functools import partial
from typing import Annotated, TypedDict

import redis.asyncio as redis
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from aiocacheguard import Cache, CacheRef, Policy, cached


class UserRow(TypedDict):
    id: int
    name: str
    score: int


class Database:
    """An in-memory stand-in for your database, counting the queries that reach it."""

    def __init__(self) -> None:
        self.users = {i: UserRow(id=i, name=f"user {i}", score=i * 10) for i in range(1, 101)}
        self.queries = 0

    async def user(self, user_id: int) -> dict[str, object] | None:
        self.queries += 1
        await asyncio.sleep(0.001)  # the round trip
        row = self.users.get(user_id)
        return None if row is None else dict(row)

    async def top_users(self, limit: int) -> list[dict[str, object]]:
        self.queries += 1
        await asyncio.sleep(0.001)
        rows = sorted(self.users.values(), key=lambda row: -row["score"])
        return [{"id": row["id"], "name": row["name"]} for row in rows[:limit]]

    async def rename(self, user_id: int, name: str) -> bool:
        self.queries += 1
        if user_id not in self.users:
            return False
        self.users[user_id]["name"] = name
        return True


database = Database()

# The Cache of this app, once the lifespan has created it.
cache_ref = CacheRef()


@cached(cache_ref, ttl=60.0, key="user:{user_id}")
async def get_user(user_id: int) -> dict[str, object] | None:
    return await database.user(user_id)  # None: cached briefly as "no such user"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    namespace = os.environ.get("CACHE_NAMESPACE", "users")
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            with cache_ref.bind(cache):
                yield
    finally:
        await client.aclose()


app = FastAPI(lifespan=lifespan)


async def get_cache() -> Cache:
    """The app's Cache, for handlers (``async``, so FastAPI calls it without a thread)."""
    return cache_ref.cache


CacheDependency = Annotated[Cache, Depends(get_cache)]


class Rename(BaseModel):
    name: str


@app.get("/users/{user_id}")
async def read_user(user_id: int) -> dict[str, object]:
    user = await get_user(user_id)
    if user is None:
        raise HTTPException(status_code=404, detail="no such user")
    return user


@app.put("/users/{user_id}")
async def rename_user(user_id: int, body: Rename, cache: CacheDependency) -> dict[str, object]:
    if not await database.rename(user_id, body.name):
        raise HTTPException(status_code=404, detail="no such user")
    # Invalidate after the write: the next read loads the new name.
    await get_user.invalidate(user_id)
    await cache.delete("leaderboard")
    return {"id": user_id, "name": body.name}


@app.get("/leaderboard")
async def leaderboard(cache: CacheDependency) -> list[dict[str, object]]:
    return await cache.get_or_load("leaderboard", partial(database.top_users, 3))


@app.get("/stats")
async def stats(cache: CacheDependency) -> dict[str, int]:
    return {**asdict(cache.statistics()), "database_queries": database.queries}
