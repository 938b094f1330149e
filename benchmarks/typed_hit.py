"""
The typed hit path: one caller reading a present key in a loop through ``Cache.get_or_load``,
with yesterday's default (stdlib ``JsonSerializer``, untyped: a tuple comes back a list) against
today's (``MsgspecJsonSerializer``), untyped and decoding into the declared type.

    python benchmarks/typed_hit.py [--ops 3000] [--repeats 5]

Each figure is the median ops/s of ``--repeats`` repetitions, the contenders interleaved in a
random order per repetition; ratios are against the stdlib JSON hit on the same value in the
same run (above 1 is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import time
from dataclasses import dataclass

import redis.asyncio as redis

from aiocacheguard import Cache, JsonSerializer, MsgspecJsonSerializer, Policy
from aiocacheguard.testing import RedisServer


@dataclass(frozen=True)
class Product:
    id: int
    name: str
    price_cents: int
    tags: tuple[str, ...]
    stock: dict[int, int]
    updated: dt.datetime


PRODUCT = Product(
    id=42,
    name="Ergonomic keyboard, split layout",
    price_cents=12_900,
    tags=("keyboards", "ergonomic", "bestseller"),
    stock={1: 12, 2: 0, 3: 7},
    updated=dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.UTC),
)
#: The same data as plain JSON types, what the untyped contenders store.
PLAIN = {
    "id": 42,
    "name": "Ergonomic keyboard, split layout",
    "price_cents": 12_900,
    "tags": ["keyboards", "ergonomic", "bestseller"],
    "stock": {"1": 12, "2": 0, "3": 7},
    "updated": "2026-11-26T09:30:00Z",
}


async def rate(cache: Cache, ops: int, returns: object) -> float:
    async def never() -> object:
        raise AssertionError("a hit")

    started = time.perf_counter()
    for _ in range(ops):
        await cache.get_or_load("product", never, returns=returns)
    return ops / (time.perf_counter() - started)


async def main(port: int, ops: int, repeats: int) -> None:
    client = redis.Redis(port=port)
    policy = Policy(ttl=3600.0)
    caches = {
        "stdlib json, untyped": (Cache(client, namespace="j", policy=policy,
                                       serializer=JsonSerializer()), PLAIN, None),
        "msgspec json, untyped": (Cache(client, namespace="m", policy=policy,
                                        serializer=MsgspecJsonSerializer()), PLAIN, None),
        "msgspec json, typed": (Cache(client, namespace="t", policy=policy), PRODUCT, Product),
    }  # fmt: skip
    for cache, value, _ in caches.values():
        await cache.set("product", value)
    results: dict[str, list[float]] = {name: [] for name in caches}
    rng = random.Random(7)
    for _ in range(repeats):
        order = list(caches)
        rng.shuffle(order)
        for name in order:
            cache, _, returns = caches[name]
            results[name].append(await rate(cache, ops, returns))
    base = statistics.median(results["stdlib json, untyped"])
    print(f"typed hit path: {ops} sequential get_or_load hits x {repeats} repetitions, seed 7")
    for name, rates in results.items():
        median = statistics.median(rates)
        print(f"  {name:24} {median:9,.0f} ops/s  {median / base:5.2f}x")
    for cache, _, _ in caches.values():
        await cache.aclose()
    await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with RedisServer() as server:
        asyncio.run(main(server.port, args.ops, args.repeats))
