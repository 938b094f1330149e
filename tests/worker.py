"""
A separate OS process for cross-process tests: ``python -m tests.worker '<json config>'``.

It parks ``coroutines`` callers of ``get_or_load`` on one key, prints ``ready``, waits for the
test to release it (BLPOP on ``{ns}:go``), then prints one JSON line with every caller's
outcome and its Cache statistics. The loader counts its calls across processes with INCR on
``{ns}:calls``; the first call can hang, stall or fail, as the test asks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any

import redis.asyncio as redis

from aiocacheguard import Cache, Policy


async def main(config: dict[str, Any]) -> None:
    ns = config["namespace"]
    control = redis.Redis(port=config["port"])
    client = redis.Redis(port=config["port"])
    policy = Policy(ttl=60.0, **config.get("policy", {}))
    first = config.get("first", "normal")  # normal | hang | stall | fail

    async def loader() -> dict[str, object]:
        call = await control.incr(f"{ns}:calls")
        if call == 1 and first != "normal":
            await control.rpush(f"{ns}:holder", os.getpid())
            if first == "hang":
                await asyncio.sleep(3600)
            if first == "stall":
                await asyncio.sleep(config["stall"])
                return {"by": os.getpid(), "call": call, "stale": True}
            if first == "fail":
                await asyncio.sleep(config.get("fail_after", 0.1))
                raise RuntimeError("database failed")
        await asyncio.sleep(config.get("loader_ms", 50) / 1000)
        return {"by": os.getpid(), "call": call}

    cache = Cache(client, namespace=ns, policy=policy)
    try:
        go = asyncio.Event()
        latencies: list[float] = []

        async def caller() -> object:
            await go.wait()
            started = time.perf_counter()
            try:
                return await cache.get_or_load(config.get("key", "hot"), loader)
            finally:
                latencies.append(time.perf_counter() - started)

        tasks = [asyncio.create_task(caller()) for _ in range(config["coroutines"])]
        await asyncio.sleep(0)  # let every caller park on the event
        print("ready", flush=True)
        await control.blpop([f"{ns}:go"], timeout=60)
        released = time.time()
        go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        finished = time.time()
    finally:
        await cache.aclose(drain=True)  # background refreshes finish, so their loads count
    stats = dataclasses.asdict(cache.statistics())
    await client.aclose()
    await control.aclose()

    values = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    latencies.sort()
    report = {
        "pid": os.getpid(),
        "served": len(values),
        "empty": sum(1 for v in values if v is None),
        "errors": errors,
        "distinct": sorted({json.dumps(v, sort_keys=True) for v in values}),
        "p50": latencies[len(latencies) // 2] if latencies else None,
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else None,
        "max": latencies[-1] if latencies else None,
        "released": released,
        "finished": finished,
        "stats": stats,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
