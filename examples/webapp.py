"""
A Starlette service whose handlers await the cache, with a real SQL database behind it.

The database is SQLite, queried in a worker thread through anyio, and counts its queries.
Two surfaces: ``/products/{id}`` goes through a ``@cached`` loader (absent products are cached
as negative results, so a scan of ids that do not exist stops reaching SQLite), and
``/leaderboard`` awaits ``cache.get_or_load`` directly in the handler.

Run it (needs ``pip install uvicorn``; a throwaway redis-server is started for you)::

    python examples/webapp.py
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aiocacheguard import Cache, CacheRef, Policy, cached


class Database:
    """SQLite with a query counter: the origin the cache protects."""

    def __init__(self) -> None:
        self._connection = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self.queries = 0
        with self._connection:
            self._connection.execute(
                "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price INTEGER)"
            )
            self._connection.executemany(
                "INSERT INTO products VALUES (?, ?, ?)",
                [(i, f"product {i}", 100 + i) for i in range(1, 101)],
            )

    def _query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with self._lock:
            self.queries += 1
            return self._connection.execute(sql, params).fetchall()

    async def product(self, product_id: int) -> dict[str, object] | None:
        rows = await anyio.to_thread.run_sync(
            self._query, "SELECT id, name, price FROM products WHERE id = ?", product_id
        )
        if not rows:
            return None
        pid, name, price = rows[0]
        return {"id": pid, "name": name, "price": price}

    async def top_products(self) -> list[dict[str, object]]:
        rows = await anyio.to_thread.run_sync(
            self._query, "SELECT id, name FROM products ORDER BY price DESC LIMIT 3"
        )
        return [{"id": pid, "name": name} for pid, name in rows]


def create_app(
    cache: Cache | CacheRef,
    database: Database,
    *,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """
    The service, on a Database you own and a Cache: one you own, or a `CacheRef` that
    ``lifespan`` binds when the app starts (as `serve` does).
    """
    ref = cache if isinstance(cache, CacheRef) else None

    @cached(cache, key="product:{product_id}")
    async def get_product(product_id: int) -> dict[str, object] | None:
        return await database.product(product_id)

    async def product(request: Request) -> JSONResponse:
        found = await get_product(int(request.path_params["product_id"]))
        if found is None:
            return JSONResponse({"error": "no such product"}, status_code=404)
        return JSONResponse(found)

    async def leaderboard(request: Request) -> JSONResponse:
        current = ref.cache if ref is not None else cache
        assert isinstance(current, Cache)
        return JSONResponse(await current.get_or_load("leaderboard", database.top_products))

    return Starlette(
        routes=[
            Route("/products/{product_id:int}", product),
            Route("/leaderboard", leaderboard),
        ],
        lifespan=lifespan,
    )


def serve(redis_url: str, database: Database, *, namespace: str = "shop") -> Starlette:
    """The service with its lifespan: a Cache made when it starts, closed when it stops."""
    ref = CacheRef()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Cache.from_url(redis_url, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            with ref.bind(cache):
                yield

    return create_app(ref, database, lifespan=lifespan)


def main() -> None:  # pragma: no cover - a manual demo
    import uvicorn

    from aiocacheguard.testing import RedisServer

    with RedisServer() as server:
        uvicorn.run(serve(server.url, Database()), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
