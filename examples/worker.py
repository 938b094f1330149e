"""
A worker process beside the FastAPI app, sharing its cached loaders: it refreshes the entry of
each user another service reports changed, so the app's next read is a hit on the new row.

Events arrive on a Redis list (``LPUSH users:changed <id>``); ``stop`` ends the worker. The
loaders are imported from the app (in your project, from a module both import) and bound to
the worker's own Cache, as the app's lifespan binds its own.

Run it (needs a Redis at ``REDIS_URL``)::

    REDIS_URL=redis://127.0.0.1:6379/0 python examples/worker.py
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as redis
from fastapi_app import cache_ref, get_user

from aiocacheguard import Cache, Policy


async def main() -> int:
    """Refresh each changed user until ``stop``; returns how many were refreshed."""
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    namespace = os.environ.get("CACHE_NAMESPACE", "users")
    queue = f"{namespace}:changed"
    refreshed = 0
    try:
        async with Cache(client, namespace=namespace, policy=Policy(ttl=30.0)) as cache:
            with cache_ref.bind(cache):
                while (event := await client.brpop([queue])) is not None:
                    if event[1] == b"stop":
                        break
                    # Delete first: a load that began before the change can no longer write.
                    await get_user.invalidate(int(event[1]))
                    await get_user(int(event[1]))  # load and write the new row
                    refreshed += 1
    finally:
        await client.aclose()
    return refreshed


if __name__ == "__main__":
    print(f"refreshed {asyncio.run(main())} users")
