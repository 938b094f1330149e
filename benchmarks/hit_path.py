"""
The hit path: 100 concurrent reads of present keys, aiocacheguard's Cache.get against raw
redis.asyncio GET + json.loads, in the same run, interleaved, reported as a ratio.

    python benchmarks/hit_path.py [--redis-url URL] [--batches 300] [--repeats 7]

Two scenarios: one hot key (the Cache coalesces the 100 reads into one GET) and 100 distinct
keys (the Cache batches them into one MGET; raw redis.asyncio sends 100 GETs over up to 100
pooled connections). Each figure is the median time of a batch of 100 concurrent reads; the
ratio is raw time / Cache time, so above 1 means the Cache is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis import __version__ as redis_py_version

from aiocacheguard import Cache, Policy, __version__
from aiocacheguard.testing import RedisServer

VALUE = {"id": 1, "name": "Ada Lovelace", "tags": ["math", "engines"], "score": 4.2}
CONCURRENCY = 100


async def timed_batches(batch: Callable[[], Awaitable[object]], batches: int) -> float:
    """Median seconds per batch of concurrent reads."""
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        await batch()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def run(url: str, batches: int, repeats: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    namespace = f"hitbench-{rng.getrandbits(32):08x}"
    raw = redis.Redis.from_url(url)
    client = redis.Redis.from_url(url)
    cache = Cache(client, namespace=namespace, policy=Policy(ttl=600.0, jitter=0))
    keys = [f"k{i}" for i in range(CONCURRENCY)]
    for key in keys:
        await cache.set(key, VALUE)
        await raw.set(f"{namespace}-raw:{key}", json.dumps(VALUE), px=600_000)

    async def raw_get(key: str) -> object:
        data = await raw.get(f"{namespace}-raw:{key}")
        assert data is not None
        return json.loads(data)

    scenarios: dict[str, dict[str, Callable[[], Awaitable[object]]]] = {
        "one key": {
            "raw": lambda: asyncio.gather(*(raw_get("k0") for _ in range(CONCURRENCY))),
            "cache": lambda: asyncio.gather(*(cache.get("k0") for _ in range(CONCURRENCY))),
        },
        "distinct keys": {
            "raw": lambda: asyncio.gather(*(raw_get(k) for k in keys)),
            "cache": lambda: asyncio.gather(*(cache.get(k) for k in keys)),
        },
    }
    results: dict[str, Any] = {}
    for scenario, contenders in scenarios.items():
        for fn in contenders.values():  # warm up connections and code paths
            await timed_batches(fn, 20)
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            order = list(contenders)
            rng.shuffle(order)  # interleaved, in random order: drift hits both alike
            for name in order:
                samples[name].append(await timed_batches(contenders[name], batches))
        raw_ms = statistics.median(samples["raw"]) * 1000
        cache_ms = statistics.median(samples["cache"]) * 1000
        results[scenario] = {
            "raw_ms_per_batch": raw_ms,
            "cache_ms_per_batch": cache_ms,
            "ratio_raw_over_cache": raw_ms / cache_ms,
            "samples_ms": {k: [x * 1000 for x in v] for k, v in samples.items()},
        }
    await cache.aclose()
    await client.aclose()
    await raw.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    def go(url: str) -> int:
        config = {
            "concurrency": CONCURRENCY,
            "batches": args.batches,
            "repeats": args.repeats,
            "seed": args.seed,
            "aiocacheguard": __version__,
            "python": platform.python_version(),
            "redis_py": redis_py_version,
        }
        print(f"hit path: {json.dumps(config)}")
        results = asyncio.run(run(url, args.batches, args.repeats, args.seed))
        for scenario, figures in results.items():
            print(
                f"{scenario:14} raw {figures['raw_ms_per_batch']:.3f} ms/batch  "
                f"cache {figures['cache_ms_per_batch']:.3f} ms/batch  "
                f"ratio {figures['ratio_raw_over_cache']:.2f}x"
            )
        if args.json is not None:
            args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))
        return 0

    if args.redis_url:
        return go(args.redis_url)
    with RedisServer() as server:
        return go(server.url)


if __name__ == "__main__":
    sys.exit(main())
