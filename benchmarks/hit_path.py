"""
The hit path and the one-process stampede: aiocacheguard against raw redis.asyncio GET +
json.loads (and, at the stampede, against cashews and an ideal in-process single-flight), all in
one run against one Redis, reported as ratios.

    python benchmarks/hit_path.py [--redis-url URL] [--repeats 5] [--json FILE]

Scenarios (each figure is the median of ``--repeats`` repetitions, the contenders of a
scenario interleaved in random order so drift hits them alike; no L1 unless named):

    sequential get          one caller reads a present ~200 B key in a loop: ``Cache.get`` vs
                            raw GET + json.loads, ops/s over ``--ops`` reads per repetition;
                            also the median of per-round ratios over ``--repeats x --ops /
                            --block`` rounds of ``--block`` reads each (paired blocks), which
                            drift on a shared machine disturbs less
    sequential get_or_load  the same with ``Cache.get_or_load`` on a hit
    sequential get L1,      the same through a Cache with ``local=LocalCache()`` (hits served by
    ..._or_load L1          the L1), ``--ops`` x 20 reads per repetition
    invalidation            a writer process calls ``Cache.set`` (``--versions`` times, 20 ms
                            apart); this process polls ``Cache.get`` through its L1; the delay
                            from the writer's ``set()`` returning to this process's first read
                            of the new value, on CLOCK_MONOTONIC (shared by processes), p50/p99
    one key                 100 concurrent reads of one key (the Cache coalesces them), ms per
                            batch, median of ``--batches`` batches per repetition
    distinct keys           100 concurrent reads of 100 distinct keys (the Cache batches them;
                            raw sends 100 GETs through ``asyncio.gather``)
    stampede 1 x 5,000      one process, 5,000 coroutines released at one just-expired key, loader
                            50 ms, through ``aiocacheguard bench``'s harness: ``guard``
                            (``Cache.get_or_load``), ``cashews-locked`` from peers.py (cashews
                            ``@cache(lock=True, protected=True)``, its in-process thunder
                            protection) and ``ideal`` (one shared asyncio task, no Redis);
                            ``--repeats`` rounds each, medians of p50, p99 and loader calls

Every ratio reads "above 1 is better for aiocacheguard" except the stampede's p99 ratios
(aiocacheguard p99 / other p99: below 1 is better).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # spawned bench workers import peers by name

import redis.asyncio as redis

from aiocacheguard import Cache, LocalCache, Policy
from aiocacheguard._redact import redact_url

try:
    from aiocacheguard.testing import RedisServer
    from aiocacheguard.tools.bench import BenchConfig, environment, run_bench
except ImportError:  # the layout before f310cc9, to measure the recorded commits with this script
    from aiocacheguard.bench import BenchConfig, environment, run_bench  # type: ignore
    from aiocacheguard.server import RedisServer  # type: ignore

# About 200 bytes of JSON, the size issue 12 names.
VALUE = {
    "id": 1,
    "name": "Ada Lovelace",
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "score": 4.2,
    "bio": "Wrote the first published algorithm for the Analytical Engine, 1843, notes A-G.",
}
CONCURRENCY = 100
STAMPEDE_COROUTINES = 5_000
STAMPEDE_LOADER_MS = 50.0


async def ops_per_second(op: Callable[[], Awaitable[object]], ops: int) -> float:
    """One caller doing ``op`` ``ops`` times in a row: operations per second."""
    started = time.perf_counter()
    for _ in range(ops):
        await op()
    return ops / (time.perf_counter() - started)


async def ms_per_batch(batch: Callable[[], Awaitable[object]], batches: int) -> float:
    """Median milliseconds per batch of concurrent reads."""
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        await batch()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def interleaved(
    rng: random.Random,
    contenders: dict[str, Callable[[], Awaitable[float]]],
    repeats: int,
) -> dict[str, list[float]]:
    """Each contender's figure ``repeats`` times, the order shuffled in every repetition."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        order = list(contenders)
        rng.shuffle(order)
        for name in order:
            samples[name].append(await contenders[name]())
    return samples


async def hit_path(url: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    namespace = f"hitbench-{rng.getrandbits(32):08x}"
    raw = redis.Redis.from_url(url)
    client = redis.Redis.from_url(url)
    cache = Cache(client, namespace=namespace, policy=Policy(ttl=600.0, jitter=0))
    near_client = redis.Redis.from_url(url)
    near = Cache(
        near_client, namespace=namespace, policy=Policy(ttl=600.0, jitter=0), local=LocalCache()
    )
    await near.__aenter__()  # the L1 serves once its listener listens
    keys = [f"k{i}" for i in range(CONCURRENCY)]
    for key in keys:
        await cache.set(key, VALUE)
        await raw.set(f"{namespace}-raw:{key}", json.dumps(VALUE), px=600_000)

    async def raw_get(key: str) -> object:
        data = await raw.get(f"{namespace}-raw:{key}")
        assert data is not None
        return json.loads(data)

    async def never() -> object:
        raise AssertionError("the key is present: the loader must not run")

    results: dict[str, Any] = {}

    # Sequential: one caller, one present key, ops/s.
    sequential: dict[str, Callable[[], Awaitable[object]]] = {
        "raw": lambda: raw_get("k0"),
        "get": lambda: cache.get("k0"),
        "get_or_load": lambda: cache.get_or_load("k0", never),
        "get L1": lambda: near.get("k0"),
        "get_or_load L1": lambda: near.get_or_load("k0", never),
    }
    for op in sequential.values():  # warm up connections and code paths (and fill the L1)
        await ops_per_second(op, 500)
    assert near.statistics().local_hits > 0, "the L1 is not serving"

    def rates(reads: int) -> dict[str, Callable[[], Awaitable[float]]]:
        """Each contender's ops/s over ``reads`` reads (20 times as many from the L1)."""
        return {
            name: (lambda op=op, n=reads * (20 if "L1" in name else 1): ops_per_second(op, n))
            for name, op in sequential.items()
        }

    samples = await interleaved(rng, rates(args.ops), args.repeats)
    # The same in short blocks, many rounds: on a shared machine the rate drifts within one
    # repetition of --ops reads, so each round's contenders (shuffled) are compared with each
    # other, and the median of those per-round ratios is reported beside the ratio of medians.
    blocks = await interleaved(rng, rates(args.block), args.repeats * args.ops // args.block)
    raw_rate = statistics.median(samples["raw"])
    for name in ("get", "get_or_load", "get L1", "get_or_load L1"):
        rate = statistics.median(samples[name])
        results[f"sequential {name}"] = {
            "unit": "ops/s",
            "raw": raw_rate,
            "cache": rate,
            "ratio_cache_over_raw": rate / raw_rate,
            "ratio_paired_blocks": statistics.median(
                c / r for c, r in zip(blocks[name], blocks["raw"], strict=True)
            ),
            "blocks": len(blocks["raw"]),
            "samples": {"raw": samples["raw"], "cache": samples[name]},
        }

    # Concurrent: 100 reads at once, ms per batch (lower is better).
    concurrent: dict[str, dict[str, Callable[[], Awaitable[object]]]] = {
        "one key": {
            "raw": lambda: asyncio.gather(*(raw_get("k0") for _ in range(CONCURRENCY))),
            "cache": lambda: asyncio.gather(*(cache.get("k0") for _ in range(CONCURRENCY))),
        },
        "distinct keys": {
            "raw": lambda: asyncio.gather(*(raw_get(k) for k in keys)),
            "cache": lambda: asyncio.gather(*(cache.get(k) for k in keys)),
        },
    }
    for scenario, contenders in concurrent.items():
        for fn in contenders.values():  # warm up connections and code paths
            await ms_per_batch(fn, 20)
        samples = await interleaved(
            rng,
            {name: (lambda f=fn: ms_per_batch(f, args.batches)) for name, fn in contenders.items()},
            args.repeats,
        )
        raw_ms = statistics.median(samples["raw"])
        cache_ms = statistics.median(samples["cache"])
        results[scenario] = {
            "unit": "ms per batch of 100",
            "raw": raw_ms,
            "cache": cache_ms,
            "ratio_raw_over_cache": raw_ms / cache_ms,
            "samples": samples,
        }
    results["invalidation"] = await invalidation(url, near, args.versions)
    await near.aclose()
    await near_client.aclose()
    await cache.aclose()
    await client.aclose()
    await raw.aclose()
    return results


_WRITER = """
import asyncio, sys, time
import redis.asyncio as redis
from aiocacheguard import Cache, LocalCache, Policy

async def main(url, namespace, versions):
    client = redis.Redis.from_url(url)
    policy = Policy(ttl=600.0, jitter=0)
    async with Cache(client, namespace=namespace, policy=policy, local=LocalCache()) as cache:
        sys.stdin.readline()
        for version in range(1, versions + 1):
            await cache.set("inv", version)
            print(version, time.monotonic(), flush=True)  # when set() returned
            await asyncio.sleep(0.02)
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def invalidation(url: str, near: Cache, versions: int) -> dict[str, Any]:
    """Writer in another process, reader here through its L1: set() returned -> seen."""
    await near.set("inv", 0)
    seen: dict[int, float] = {}
    stale_after_return = 0  # reads of an older version after the writer's set() returned

    async def poll() -> None:
        last = 0
        while last < versions:
            value = await near.get("inv")
            assert isinstance(value, int) and value >= last, value
            if value > last:
                now = time.monotonic()
                for v in range(last + 1, value + 1):
                    seen[v] = now
                last = value
            await asyncio.sleep(0)

    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, url, near.namespace, str(versions),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert writer.stdin is not None and writer.stdout is not None
    hits_before = near.statistics().local_hits
    poller = asyncio.create_task(poll())
    writer.stdin.write(b"go\n")
    await writer.stdin.drain()
    returned: dict[int, float] = {}
    async for line in writer.stdout:
        version, at = line.split()
        returned[int(version)] = float(at)
    await writer.wait()
    await asyncio.wait_for(poller, 10)
    delays = sorted(max(0.0, seen[v] - returned[v]) * 1000 for v in returned)
    for v in returned:
        stale_after_return += seen[v] > returned[v]
    q = statistics.quantiles(delays, n=100)
    return {
        "unit": "ms from the writer's set() returning to this process reading the new value",
        "versions": versions,
        "p50_ms": statistics.median(delays),
        "p99_ms": q[98],
        "max_ms": delays[-1],
        "seen_after_set_returned": stale_after_return,
        "l1_hits_while_polling": near.statistics().local_hits - hits_before,
    }


def stampede(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from peers import PEERS

    extra = {}
    strategies = ["ideal", "guard"]
    module, factory = PEERS["cashews-locked"]
    if importlib.util.find_spec(module):
        extra["cashews-locked"] = factory
        strategies.append("cashews-locked")
    else:
        print("stampede: cashews is not installed, its row is skipped")
    config = BenchConfig(
        coroutines=STAMPEDE_COROUTINES, processes=1, loader_ms=STAMPEDE_LOADER_MS,
        rounds=args.repeats, strategies=tuple(strategies), seed=args.seed, redis_url=url,
        extra=extra,
    )  # fmt: skip
    results = run_bench(
        config,
        on_round=lambda s, n, r: print(
            f"  stampede {s} round {n}: {r.loader_calls} loader calls, p50 {r.p50_ms:,.1f} ms, "
            f"p99 {r.p99_ms:,.1f} ms, served {r.served:,}, errors {r.errors}",
            flush=True,
        ),
    )
    out: dict[str, Any] = {
        r.strategy: {"median": r.summary(), "rounds": [x.figures() for x in r.rounds]}
        for r in results
    }
    guard_p99 = out["guard"]["median"]["p99_ms"]
    out["ratios"] = {"guard_p99_over_ideal_p99": guard_p99 / out["ideal"]["median"]["p99_ms"]}
    if "cashews-locked" in out:
        out["ratios"]["guard_p99_over_cashews_p99"] = (
            guard_p99 / out["cashews-locked"]["median"]["p99_ms"]
        )
    return out


def versions(url: str) -> dict[str, Any]:
    found = environment(url)
    for package in ("hiredis", "cashews", "aiocache"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    import aiocacheguard

    source = Path(aiocacheguard.__file__).resolve().parent.parent
    try:
        found["aiocacheguard_commit"] = subprocess.run(
            ["git", "-C", str(source), "log", "-1", "--format=%h"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--", "aiocacheguard"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        found["aiocacheguard_tree_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        found["aiocacheguard_commit"] = None
    found["aiocacheguard_path"] = str(source)
    found["load_average"] = os.getloadavg()
    return found


def report(results: dict[str, Any]) -> None:
    for name in (
        "sequential get", "sequential get_or_load", "sequential get L1", "sequential get_or_load L1"
    ):  # fmt: skip
        r = results[name]
        print(
            f"{name:30} raw {r['raw']:8,.0f} ops/s  cache {r['cache']:8,.0f} ops/s  "
            f"ratio {r['ratio_cache_over_raw']:.2f}x  "
            f"(paired blocks {r['ratio_paired_blocks']:.2f}x)"
        )
    for name in ("one key", "distinct keys"):
        r = results[name]
        print(
            f"{'100 concurrent, ' + name:30} raw {r['raw']:8.3f} ms/batch  cache "
            f"{r['cache']:8.3f} ms/batch  ratio {r['ratio_raw_over_cache']:.2f}x"
        )
    inv = results["invalidation"]
    print(
        f"{'invalidation across processes':30} p50 {inv['p50_ms']:.2f} ms  "
        f"p99 {inv['p99_ms']:.2f} ms  max {inv['max_ms']:.2f} ms over {inv['versions']} writes"
    )
    s = results.get("stampede")
    if s is None:
        return
    print(
        f"stampede 1 x {STAMPEDE_COROUTINES:,} coroutines, loader {STAMPEDE_LOADER_MS:g} ms, "
        "medians:"
    )
    for name in ("ideal", "guard", "cashews-locked"):
        if name in s:
            m = s[name]["median"]
            print(
                f"  {name:16} loader calls {m['loader_calls']:4.0f}  served {m['served']:6,.0f}  "
                f"errors {m['errors']:3.0f}  p50 {m['p50_ms']:7.1f} ms  p99 {m['p99_ms']:7.1f} ms"
            )
    for name, value in s["ratios"].items():
        print(f"  {name} {value:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="default: a throwaway redis-server")
    parser.add_argument("--repeats", type=int, default=5, help="per scenario; medians reported")
    parser.add_argument("--ops", type=int, default=3_000, help="sequential reads per repetition")
    parser.add_argument("--block", type=int, default=200, help="sequential reads per paired block")
    parser.add_argument("--batches", type=int, default=300, help="concurrent batches per repeat")
    parser.add_argument("--versions", type=int, default=500, help="writes, invalidation scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stampede", action="store_true", help="hit path only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    stampede_config = {
        "processes": 1, "coroutines": STAMPEDE_COROUTINES, "loader_ms": STAMPEDE_LOADER_MS
    }  # fmt: skip

    def go(url: str) -> int:
        started = time.time()
        config = {
            "value_bytes": len(json.dumps(VALUE)),
            "concurrency": CONCURRENCY,
            "ops": args.ops,
            "block": args.block,
            "batches": args.batches,
            "repeats": args.repeats,
            "seed": args.seed,
            "stampede": None if args.no_stampede else stampede_config,
            "l1": "LocalCache() in the L1 scenarios only",
        }
        env = versions(url)
        print(f"hit path: {json.dumps(config)}")
        print(f"versions: {json.dumps(env)}", flush=True)
        rng = random.Random(args.seed)
        results = asyncio.run(hit_path(url, args, rng))
        if not args.no_stampede:
            results["stampede"] = stampede(url, args)
        report({"stampede": {"ratios": {}}, **results})
        if args.json is not None:
            document = {
                "tool": "benchmarks/hit_path.py",
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "argv": [redact_url(arg) for arg in sys.argv],  # --redis-url's password
                "config": config,
                "versions": env,
                "results": results,
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0

    if args.redis_url:
        return go(args.redis_url)
    with RedisServer() as server:
        return go(server.url)


if __name__ == "__main__":
    sys.exit(main())
