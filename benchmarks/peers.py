"""
The stampede scenario through the peers, beside aiocacheguard, in one run of one harness.

    pip install -e '.[bench,peers]'
    python benchmarks/peers.py -n 10000 -p 4 --rounds 3 --json benchmarks/results/peers.json

Strategies added to ``aiocacheguard bench``'s:
    cashews-locked   cashews ``@cache(ttl, lock=True, protected=True)``: its in-process thunder
                     protection plus its Redis lock (waiters poll SET NX), its best stampede setup
    aiocache-stampede  aiocache ``@cached_stampede(lease=...)``: RedLock, waiters sleep the lease

Each peer gets the same worker processes, release instant, loader and Redis as ours, and a
connection pool of 50 like the raw strategies. Peers that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import this module by name

try:
    from aiocacheguard.testing import RedisServer
    from aiocacheguard.tools.bench import BenchConfig, results_json, run_bench
    from aiocacheguard.tools.cli import _print_table
except ImportError:  # the layout before f310cc9, to measure the recorded commits with this script
    from aiocacheguard.bench import BenchConfig, results_json, run_bench  # type: ignore
    from aiocacheguard.cli import _print_table  # type: ignore
    from aiocacheguard.server import RedisServer  # type: ignore

Getter = tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]


async def cashews_locked(job: dict[str, Any], load: Callable[[], Awaitable[Any]]) -> Getter:
    from cashews import Cache

    cache = Cache()
    cache.setup(job["url"], max_connections=50, suppress=False)

    @cache(ttl="60s", key=f"{job['namespace']}:{job['key']}", lock=True, protected=True)
    async def get() -> Any:
        return await load()

    await cache.ping()
    return get, cache.close


async def aiocache_stampede(job: dict[str, Any], load: Callable[[], Awaitable[Any]]) -> Getter:
    from aiocache import RedisCache, cached_stampede

    # aiocache logs a traceback per failed call: under this stampede that made a 374 MB console
    # record. The failures are counted in the report's error_kinds instead.
    logging.getLogger("aiocache").setLevel(logging.CRITICAL)
    from redis.asyncio import BlockingConnectionPool

    url = urlparse(job["url"])
    # A blocking pool: aiocache's default pool raises MaxConnectionsError under a stampede.
    pool = {"pool_max_size": 50, "connection_pool_class": BlockingConnectionPool}
    cache = RedisCache(endpoint=url.hostname, port=url.port, **pool)

    @cached_stampede(lease=2, ttl=60, key=f"{job['namespace']}:{job['key']}", cache=RedisCache,
                     endpoint=url.hostname, port=url.port, **pool)  # fmt: skip
    async def get() -> Any:
        return await load()

    await cache.exists("warm-up")  # the connection pool is open, as in a running server

    async def close() -> None:
        await cache.close()
        await get.cache.close()

    return get, close


PEERS = {
    "cashews-locked": ("cashews", "peers:cashews_locked"),
    "aiocache-stampede": ("aiocache", "peers:aiocache_stampede"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url")
    parser.add_argument("-n", "--coroutines", type=int, default=10_000)
    parser.add_argument("-p", "--processes", type=int, default=4)
    parser.add_argument("--loader-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--strategy", action="append", help="default: naive, seed-mutex, guard and the peers"
    )
    args = parser.parse_args()
    extra = {
        name: path for name, (module, path) in PEERS.items() if importlib.util.find_spec(module)
    }
    for name in set(PEERS) - set(extra):
        print(f"skipping {name}: {PEERS[name][0]} is not installed (pip install -e '.[peers]')")
    strategies = tuple(args.strategy or ("naive", "seed-mutex", "guard", *extra))

    def run(url: str) -> int:
        config = BenchConfig(
            coroutines=args.coroutines, processes=args.processes, loader_ms=args.loader_ms,
            rounds=args.rounds, strategies=strategies, seed=args.seed, redis_url=url, extra=extra,
        )  # fmt: skip
        print(
            f"{config.coroutines:,} coroutines x {config.processes} process(es), loader "
            f"{config.loader_ms:g} ms, {config.rounds} round(s), seed {config.seed}",
            flush=True,
        )
        started = time.time()
        results = run_bench(
            config,
            on_round=lambda s, n, r: print(f"  {s} round {n}: p99 {r.p99_ms:,.1f} ms", flush=True),
        )
        _print_table(results, fancy=False)
        if args.json is not None:
            args.json.write_text(
                json.dumps(results_json(config, results, started=started), indent=2)
            )
            print(f"wrote {args.json}")
        return 0

    if args.redis_url:
        return run(args.redis_url)
    with RedisServer() as server:
        return run(server.url)


if __name__ == "__main__":
    raise SystemExit(main())
