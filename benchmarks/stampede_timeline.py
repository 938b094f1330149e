"""
Where the time of a one-process stampede goes: ``guard`` (`Cache.get_or_load`) against
``ideal`` (one shared in-memory task, no Redis).

    python benchmarks/stampede_timeline.py [-n 5000] [--rounds 7] [--loader-ms 50] [--no-gc]

Each round releases ``-n`` callers of one missing key at once and reports, from the release:
when the loader started, when it returned, when the first caller got the value, and the
callers' p99. Rounds alternate between the strategies (each going first in every other
round), in one process against a throwaway redis-server; medians are printed with the ratio of
guard's p99 to ideal's. ``--no-gc`` turns Python's garbage collector off, to tell its full
collections (a round 15-25 ms slower, in either strategy) from the strategies' own costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.testing import RedisServer

Get = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True)
class Round:
    load_start: float
    load_end: float
    first_done: float
    p99: float


async def stampede(callers: int, loader_s: float, get: Get) -> Round:
    marks: dict[str, float] = {}
    go = asyncio.Event()
    done: list[float] = []

    async def load() -> dict[str, int]:
        marks["start"] = time.perf_counter()
        await asyncio.sleep(loader_s)
        marks["end"] = time.perf_counter()
        return {"value": 1}

    async def caller() -> None:
        await go.wait()
        await get(load)
        done.append(time.perf_counter())

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await asyncio.sleep(0)
    released = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    ms = sorted((t - released) * 1e3 for t in done)
    return Round(
        load_start=(marks["start"] - released) * 1e3,
        load_end=(marks["end"] - released) * 1e3,
        first_done=ms[0],
        p99=ms[int(len(ms) * 0.99)],
    )


async def run(callers: int, rounds: int, loader_s: float) -> dict[str, list[Round]]:
    results: dict[str, list[Round]] = {"guard": [], "ideal": []}
    with RedisServer() as server:
        client = redis.Redis(port=server.port)
        async with Cache(client, namespace="timeline", policy=Policy(ttl=60.0)) as cache:

            async def warm() -> str:
                return "warm"

            await cache.get_or_load("warm-up", warm)  # connections open, scripts loaded
            for n in range(rounds):
                key = f"key-{n}"

                async def guard(load: Callable[[], Awaitable[Any]], key: str = key) -> Any:
                    return await cache.get_or_load(key, load)

                shared: list[asyncio.Future[Any]] = []

                async def ideal(
                    load: Callable[[], Awaitable[Any]],
                    shared: list[asyncio.Future[Any]] = shared,
                ) -> Any:
                    if not shared:
                        shared.append(asyncio.ensure_future(load()))
                    return await shared[0]

                # Each strategy goes first in every other round.
                contenders: list[tuple[str, Get]] = [("guard", guard), ("ideal", ideal)]
                for name, get in contenders if n % 2 == 0 else contenders[::-1]:
                    results[name].append(await stampede(callers, loader_s, get))
        await client.aclose()
    return results


def report(title: str, results: dict[str, list[Round]]) -> None:
    print(title)
    for name, rounds in results.items():
        for r in rounds:  # in the order run, alternating with the other strategy
            print(
                f"  {name:6} load starts +{r.load_start:5.1f} ms, returns +{r.load_end:5.1f}, "
                f"first caller served +{r.first_done:5.1f}, p99 {r.p99:5.1f}"
            )
    p99 = {name: statistics.median(r.p99 for r in rounds) for name, rounds in results.items()}
    print(
        f"  median p99: guard {p99['guard']:.1f} ms, ideal {p99['ideal']:.1f} ms, "
        f"guard/ideal {p99['guard'] / p99['ideal']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--callers", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loader-ms", type=float, default=50.0)
    parser.add_argument("--no-gc", action="store_true", help="garbage collector off")
    args = parser.parse_args()
    if args.no_gc:
        gc.disable()
    report(
        f"{args.callers} callers, {args.loader_ms:g} ms loader, "
        f"garbage collector {'off' if args.no_gc else 'on'}:",
        asyncio.run(run(args.callers, args.rounds, args.loader_ms / 1e3)),
    )


if __name__ == "__main__":
    main()
