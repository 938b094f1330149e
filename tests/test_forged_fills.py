"""
Issue 23, item 1: a fill message is a wake-up, never a value.

Anyone allowed to PUBLISH to ``{ns:key}:fill`` used to hand values to the processes waiting on
that key: a waiter returned ``{'balance': 1000000000}`` while the lock holder loaded 100, and
with `PickleSerializer` the message's bytes were unpickled (code ran). Waiters now take a
message as "look again" and read the key (one read per process: the single-flight has made
one waiter of its callers), so a forged message costs a re-check and nothing else.
"""

from __future__ import annotations

import asyncio
import pickle
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, PickleSerializer, Policy
from aiocacheguard.record import Record
from aiocacheguard.serializers import MsgspecJsonSerializer
from aiocacheguard.testing import FaultProxy, RedisServer

from .helpers import GatedLoader, wait_until

#: A lease far longer than any bound below: a waiter served within the bound was served by
#: the fill, not by the lease running out.
POLICY = Policy(ttl=30.0, lock_ttl=10.0, jitter=0.0)
BOUND = 5.0
CALLERS = 20  # per waiting process
JSON = MsgspecJsonSerializer.tag  # the default serializer's

#: Appended to by `_ran` when a pickle payload runs: the proof that attacker code executed.
RAN: list[str] = []


def _ran(marker: str) -> None:
    RAN.append(marker)


class Exploit:
    """Unpickling this calls `_ran` (a stand-in for ``os.system``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _ran, (self.marker,)


def planted(payload: bytes, *, tag: int) -> bytes:
    """A well-formed record anyone can write or publish with plain commands (fresh 300 s)."""
    now = time.time()
    record = Record(
        payload=payload, negative=False, serializer_tag=tag, stored_at=now, expires_at=now + 300
    )
    return record.encode()


def parked(cache: Cache) -> bool:
    """
    Whether ``cache``'s flight waits for a fill, asleep on its signal: subscribed (Redis
    confirmed it), its check of the key done, nothing to do until a message or the lease.
    """
    return any(
        entry.ready.done()
        and any(getattr(signal._event, "_waiters", None) for signal in entry.signals)
        for entry in cache._notifier._channels.values()
    )


@pytest.mark.parametrize("serializer", ["json", "pickle"])
async def test_forged_fill_message_is_not_served(
    redis_server: RedisServer, client: redis.Redis, namespace: str, serializer: str
) -> None:
    # Unsigned even with pickle: a fill message is never believed, signing or not.
    if serializer == "json":
        forged = planted(b'{"balance":1000000000}', tag=JSON)  # what the probe's waiter returned
        options: dict[str, Any] = {}
    else:
        forged = planted(pickle.dumps(Exploit(namespace)), tag=PickleSerializer.tag)
        options = {"serializer": PickleSerializer()}
    async with FaultProxy(redis_server.port) as proxy, redis.Redis.from_url(proxy.url) as proxied:
        with warnings.catch_warnings():  # pickle unsigned warns: tests/test_signing.py
            warnings.simplefilter("ignore", UserWarning)
            holder = Cache(client, namespace=namespace, policy=POLICY, **options)
            waiter = Cache(proxied, namespace=namespace, policy=POLICY, **options)
            other = Cache(client, namespace=namespace, policy=POLICY, **options)
        async with holder, waiter, other:
            await _forged_fill(client, proxy, holder, (waiter, other), forged, namespace)


async def _forged_fill(
    client: redis.Redis,
    proxy: FaultProxy,
    holder: Cache,
    waiters: tuple[Cache, Cache],
    forged: bytes,
    marker: str,
) -> None:
    """``waiters[0]`` talks to Redis through ``proxy``, so its re-check can be seen."""
    loader = GatedLoader({"balance": 100})
    holding = asyncio.create_task(holder.get_or_load("account:1", loader))
    await loader.started.wait()  # the holder has the rebuild lock and is loading
    own = GatedLoader({"balance": -1})  # the waiters' loader: must never be called
    own.release.set()
    waiting = [
        asyncio.create_task(cache.get_or_load("account:1", own))
        for cache in waiters
        for _ in range(CALLERS)
    ]
    for cache in waiters:
        await wait_until(partial(parked, cache), within=BOUND)
    sent = proxy.statistics().bytes_upstream
    waiter = waiters[0]

    channel = waiter.keys.channel(waiter.keys.value("account:1"))
    assert await client.publish(channel, forged) == len(waiters)  # anyone with PUBLISH rights
    # The waiter either believed the message (and returned) or looked at Redis again.
    await wait_until(
        lambda: waiting[0].done() or (proxy.statistics().bytes_upstream > sent and parked(waiter)),
        within=BOUND,
    )
    assert RAN.count(marker) == 0, "a forged fill's pickle ran"
    served = [task.result() for task in waiting if task.done()]
    assert not served, f"a forged fill was served: {served[0]!r} ({len(served)} callers)"

    loader.release.set()
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(holding, *waiting)
    assert results == [{"balance": 100}] * (1 + 2 * CALLERS)  # every caller: the holder's
    assert loader.calls == 1 and own.calls == 0
    assert [cache.statistics().loader_calls for cache in waiters] == [0, 0]
    assert [cache.statistics().lock_waits for cache in waiters] == [1, 1]  # one flight each
    assert RAN.count(marker) == 0
