"""The example service, driven through httpx's ASGI transport against a real Redis."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisServer

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from webapp import Database, create_app, serve


async def test_500_requests_for_an_expired_key_cause_one_query(
    client: redis.Redis, namespace: str
) -> None:
    database = Database()
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        app = create_app(cache, database)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            first = await http.get("/leaderboard")
            assert first.status_code == 200 and database.queries == 1
            # The hot key expires in Redis...
            key = cache.keys.value("leaderboard")
            await client.pexpire(key, 1)
            async with asyncio.timeout(5):
                while await client.exists(key):
                    await asyncio.sleep(0.001)
            # ...while 500 requests want it.
            responses = await asyncio.gather(*(http.get("/leaderboard") for _ in range(500)))
            assert {r.status_code for r in responses} == {200}
            assert {r.text for r in responses} == {first.text}
            assert database.queries == 2


async def test_absent_products_stop_reaching_the_database(
    client: redis.Redis, namespace: str
) -> None:
    database = Database()
    async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
        transport = httpx.ASGITransport(app=create_app(cache, database))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            ok = await http.get("/products/7")
            assert ok.status_code == 200 and ok.json()["name"] == "product 7"
            for _ in range(3):
                responses = await asyncio.gather(
                    *(http.get(f"/products/{i}") for i in range(1000, 1100))
                )
                assert {r.status_code for r in responses} == {404}
            assert database.queries == 1 + 100  # each absent id once, then its cached None


def test_the_served_app_runs_its_lifespan_twice(redis_server: RedisServer, namespace: str) -> None:
    """serve(): the Cache is made when the app starts and closed when it stops, each time."""
    from starlette.testclient import TestClient

    database = Database()
    app = serve(redis_server.url, database, namespace=namespace)
    for _ in range(2):
        with TestClient(app) as http:
            for _ in range(3):
                assert http.get("/leaderboard").status_code == 200
                assert http.get("/products/7").json()["name"] == "product 7"
    # one query per key: the second lifespan's Cache read what the first one wrote
    assert database.queries == 2
