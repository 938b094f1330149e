"""Logical expiry, XFetch, stale-if-error, jitter and the supervised refreshes, on real Redis."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Policy
from aiocacheguard.guards.refresh import xfetch_due
from aiocacheguard.record import Record

from .helpers import Clock, Events, GatedLoader, library_tasks, wait_until

POLICY = Policy(ttl=100.0, soft_ttl=10.0, jitter=0.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def soft(
    client: redis.Redis, namespace: str, clock: Clock, events: Events
) -> AsyncIterator[Cache]:
    async with Cache(client, namespace=namespace, policy=POLICY, clock=clock, hook=events) as c:
        yield c
    assert not library_tasks()


async def seed(cache: Cache, clock: Clock, value: object = "old", key: str = "k") -> None:
    async def load() -> object:
        return value

    assert await cache.get_or_load(key, load) == value
    clock.now += 20.0  # past soft_ttl (10 s), well before ttl (100 s)


async def test_soft_expired_key_is_served_at_once_while_one_refresh_runs(
    soft: Cache, clock: Clock, events: Events
) -> None:
    await seed(soft, clock)
    loader = GatedLoader("new")
    results = await asyncio.wait_for(
        asyncio.gather(*(soft.get_or_load("k", loader) for _ in range(1000))),
        timeout=2.0,  # the loader is blocked: nobody may wait for it
    )
    assert results == ["old"] * 1000
    await loader.started.wait()
    stats = soft.statistics()
    assert (
        stats.soft_expired_served == 1 and stats.stale_served == 0
    )  # one read, not stale-if-error
    # More reads while the refresh runs start no second one.
    assert await soft.get_or_load("k", loader) == "old"
    loader.release.set()
    await events.wait_for("refreshed")
    assert loader.calls == 1
    assert await soft.get_or_load("k", loader) == "new"
    stats = soft.statistics()
    assert (stats.refreshes, stats.refresh_errors, stats.loader_calls) == (1, 0, 2)


async def test_two_caches_on_one_soft_expired_key_refresh_once(
    client: redis.Redis, namespace: str, clock: Clock
) -> None:
    loader = GatedLoader("new")
    async with (
        Cache(client, namespace=namespace, policy=POLICY, clock=clock) as a,
        Cache(client, namespace=namespace, policy=POLICY, clock=clock) as b,
    ):
        await seed(a, clock)
        assert await a.get_or_load("k", loader) == "old"
        await loader.started.wait()  # a holds the rebuild lock
        assert await b.get_or_load("k", loader) == "old"
        loader.release.set()
        await wait_until(lambda: a.statistics().refreshes == 1)
        await wait_until(lambda: len(b._refreshes._refresher) == 0)
        assert await b.get_or_load("k", loader) == "new"
        # b, reading the old copy again now that a replaced it, does not refresh either.
        assert loader.calls == 1
        assert b.statistics().refreshes == 0


async def test_failed_refresh_keeps_serving_stale_and_retries_after_a_backoff(
    soft: Cache, clock: Clock, events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    await seed(soft, clock)
    failing = GatedLoader(error=ConnectionError("database down"))
    failing.release.set()
    assert await soft.get_or_load("k", failing) == "old"
    await events.wait_for("refresh_failed")
    assert isinstance(events.seen[-1].error, ConnectionError)
    assert "background refresh" in caplog.text and "database down" in caplog.text
    assert soft.statistics().refresh_errors == 1
    # Still served; reads right after the failure do not start a refresh each (backoff).
    for _ in range(50):
        assert await soft.get_or_load("k", failing) == "old"
    assert failing.calls == 1 and not soft._refreshes._refresher
    # Once the backoff (1 s after a first failure) has passed, a read asks again.
    clock.now += 1.5
    assert await soft.get_or_load("k", failing) == "old"
    await events.wait_for("refresh_failed", count=2)
    assert failing.calls == 2
    # One warning for the episode, not one per failure.
    assert caplog.text.count("background refresh") == 1


async def test_stale_if_error_past_the_ttl(
    client: redis.Redis, namespace: str, clock: Clock
) -> None:
    events = Events()
    policy = Policy(ttl=10.0, stale_if_error=30.0, jitter=0.0)
    async with Cache(client, namespace=namespace, policy=policy, clock=clock, hook=events) as c:
        await seed(c, clock, key="k")  # clock is now 20 s on: past ttl, within the grace
        # Redis kept the value for ttl + stale_if_error.
        assert 39_000 < await client.pttl(c.keys.value("k")) <= 40_000
        failing = GatedLoader(error=ConnectionError("database down"))
        failing.release.set()
        assert await c.get_or_load("k", failing) == "old"
        assert events.kinds() == ["loaded", "loaded", "stale_served"]  # seed, failure, stale
        assert isinstance(events.seen[1].error, ConnectionError)
        assert events.seen[1].duration is not None and events.seen[1].duration >= 0
        assert c.statistics().stale_served == 1
        assert await c.get("k", default="expired") == "expired"  # get() serves no stale value
        clock.now += 25.0  # past the grace too
        with pytest.raises(ConnectionError):
            await c.get_or_load("k", failing)


async def test_expired_value_without_stale_if_error_is_reloaded(
    client: redis.Redis, namespace: str, clock: Clock
) -> None:
    policy = Policy(ttl=10.0, jitter=0.0)
    async with Cache(client, namespace=namespace, policy=policy, clock=clock) as c:
        await seed(c, clock)  # 20 s on: expired by the record even if Redis still had it
        loader = GatedLoader("new")
        loader.release.set()
        assert await c.get_or_load("k", loader) == "new"


def test_xfetch_probability_matches_the_paper() -> None:
    rng = random.Random(20261123)
    delta, beta, n = 1.0, 1.0, 20_000
    # At one delta before expiry, P(early) = exp(-(expiry - now) / (delta * beta)) = e^-1.
    hits = sum(xfetch_due(now=0.0, expiry=1.0, delta=delta, beta=beta, rng=rng) for _ in range(n))
    expected = n * math.exp(-1)
    sigma = math.sqrt(n * math.exp(-1) * (1 - math.exp(-1)))
    assert abs(hits - expected) < 4 * sigma, (hits, expected)
    # Closer to expiry, more often; farther, less.
    near = sum(xfetch_due(now=0.9, expiry=1.0, delta=1.0, beta=1.0, rng=rng) for _ in range(n))
    far = sum(xfetch_due(now=-2.0, expiry=1.0, delta=1.0, beta=1.0, rng=rng) for _ in range(n))
    assert far < hits < near


def test_xfetch_beta_zero_never_refreshes_early() -> None:
    rng = random.Random(1)
    assert not any(
        xfetch_due(now=0.999, expiry=1.0, delta=10.0, beta=0.0, rng=rng) for _ in range(10_000)
    )


async def write_record(
    client: redis.Redis,
    cache: Cache,
    key: str,
    *,
    now: float,
    expires_in: float,
    compute_time: float,
) -> None:
    record = Record(
        payload=b'"old"',
        negative=False,
        serializer_tag=cache.serializer.tag,
        stored_at=now,
        expires_at=now + expires_in,
        compute_time=compute_time,
    )
    await client.set(cache.keys.value(key), record.encode(), px=60_000)


@pytest.mark.parametrize("beta", [0.0, 1.0])
async def test_xfetch_in_the_cache(client: redis.Redis, namespace: str, beta: float) -> None:
    """
    1,000 keys one second from expiry whose values took 1 s to compute: with beta=1 a read
    refreshes early with chance e^-1 (seeded), with beta=0 never.
    """
    events = Events()
    policy = Policy(ttl=60.0, early_beta=beta, jitter=0.0)
    keys = [f"k{i}" for i in range(1000)]
    clock = Clock()  # frozen: every read happens exactly 1 s before expiry
    async with Cache(
        client,
        namespace=namespace,
        policy=policy,
        hook=events,
        rng=random.Random(5),
        max_refreshes=1000,
        clock=clock,
    ) as cache:
        for key in keys:
            await write_record(client, cache, key, now=clock.now, expires_in=1.0, compute_time=1.0)

        async def load() -> str:
            return "new"

        assert await asyncio.gather(*(cache.get_or_load(k, load) for k in keys)) == ["old"] * 1000
        early = cache.statistics().early_refreshes
        if beta == 0:
            assert early == 0
        else:
            sigma = math.sqrt(1000 * math.exp(-1) * (1 - math.exp(-1)))
            assert abs(early - 1000 * math.exp(-1)) < 4 * sigma, early
        await events.wait_for("refreshed", count=early)
        assert cache.statistics().refreshes == early


async def test_jitter_spreads_ttls(client: redis.Redis, namespace: str) -> None:
    policy = Policy(ttl=100.0, jitter=0.2)
    async with Cache(client, namespace=namespace, policy=policy) as cache:
        keys = [f"k{i}" for i in range(1000)]

        async def load() -> int:
            return 1

        await asyncio.gather(*(cache.get_or_load(k, load) for k in keys))
        ttls = [await client.pttl(cache.keys.value(k)) for k in keys]
    assert all(80_000 - 1_000 <= t <= 100_000 for t in ttls)
    # Spread over the range: every 2-second band of the 20 holds some keys.
    bands = {min(9, int((100_000 - t) // 2_000)) for t in ttls}
    assert bands == set(range(10))


async def test_no_jitter_writes_the_exact_ttl(client: redis.Redis, namespace: str) -> None:
    async with Cache(client, namespace=namespace, policy=Policy(ttl=100.0, jitter=0)) as cache:
        await cache.set("k", 1)
        assert 99_000 < await client.pttl(cache.keys.value("k")) <= 100_000


async def refresh_in_flight(
    client: redis.Redis, namespace: str, clock: Clock
) -> tuple[Cache, GatedLoader]:
    """A Cache whose soft-expired key is being refreshed by a loader blocked until released."""
    cache = Cache(client, namespace=namespace, policy=POLICY, clock=clock)
    await seed(cache, clock)
    loader = GatedLoader("new")
    assert await cache.get_or_load("k", loader) == "old"
    await loader.started.wait()
    return cache, loader


async def test_aclose_cancels_a_refresh_in_flight(
    client: redis.Redis, namespace: str, clock: Clock
) -> None:
    cache, loader = await refresh_in_flight(client, namespace, clock)
    assert library_tasks()
    await cache.aclose()
    assert loader.cancelled.is_set()
    assert not library_tasks()
    # The lock was released on the way out: a new Cache can refresh at once.
    async with Cache(client, namespace=namespace, policy=POLICY, clock=clock) as again:
        fresh = GatedLoader("newer")
        fresh.release.set()
        assert await again.refresh("k", fresh) == "newer"


async def test_aclose_drain_waits_for_the_refresh(
    client: redis.Redis, namespace: str, clock: Clock
) -> None:
    cache, loader = await refresh_in_flight(client, namespace, clock)
    closing = asyncio.create_task(cache.aclose(drain=True))
    await asyncio.sleep(0)
    assert not closing.done()
    loader.release.set()
    await closing
    assert not library_tasks()
    async with Cache(client, namespace=namespace, policy=POLICY) as reader:
        assert await reader.get("k") == "new"


async def test_refresh_forces_a_reload_and_concurrent_refreshes_share_it(soft: Cache) -> None:
    await soft.set("k", "old")
    loader = GatedLoader("new")
    tasks = [asyncio.create_task(soft.refresh("k", loader)) for _ in range(50)]
    await loader.started.wait()
    loader.release.set()
    assert await asyncio.gather(*tasks) == ["new"] * 50
    assert loader.calls == 1
    assert await soft.get("k") == "new"


async def test_refreshes_are_bounded(client: redis.Redis, namespace: str, clock: Clock) -> None:
    async with Cache(
        client, namespace=namespace, policy=POLICY, clock=clock, max_refreshes=3
    ) as cache:
        for i in range(10):
            await seed(cache, clock, key=f"k{i}")
            clock.now -= 20.0
        clock.now += 20.0
        loader = GatedLoader("new")
        results = await asyncio.gather(*(cache.get_or_load(f"k{i}", loader) for i in range(10)))
        assert results == ["old"] * 10
        await wait_until(lambda: loader.calls == 3)  # each refresh reaches its loader
        assert len(cache._refreshes._refresher) == 3
        loader.release.set()
        await wait_until(lambda: len(cache._refreshes._refresher) == 0)
        # The dropped ones are asked for again by their next reads, three at a time.
        for _ in range(3):
            await asyncio.gather(*(cache.get_or_load(f"k{i}", loader) for i in range(10)))
            await wait_until(lambda: len(cache._refreshes._refresher) == 0)
        assert cache.statistics().refreshes == 10 and loader.calls == 10
        assert await asyncio.gather(*(cache.get(f"k{i}") for i in range(10))) == ["new"] * 10


async def test_failing_refreshes_are_said_once_per_episode_with_counts(
    client: redis.Redis,
    namespace: str,
    clock: Clock,
    events: Events,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refreshes of other keys succeeding in between used to start a new warning each time."""
    caplog.set_level(logging.INFO, "aiocacheguard")
    policy = Policy(ttl=1000.0, soft_ttl=10.0, jitter=0.0)
    async with Cache(client, namespace=namespace, policy=policy, clock=clock, hook=events) as c:
        for i in range(40):
            await seed(c, clock, value=f"old {i}", key=f"k{i}")
        failing = GatedLoader(error=ConnectionError("database down"))
        failing.release.set()
        working = GatedLoader("new 1")
        working.release.set()

        async def refresh(i: int, loader: GatedLoader, stale: str = "old") -> None:
            kind = "refreshed" if loader is working else "refresh_failed"
            before = events.count(kind)
            assert await c.get_or_load(f"k{i}", loader) == f"{stale} {i}"  # served stale
            await events.wait_for(kind, before + 1)

        for i in range(40):  # failures and successes of other keys, one after another
            await refresh(i, working if i % 2 else failing)

        def lines(level: int) -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno == level]

        assert len(lines(logging.WARNING)) == 1, lines(logging.WARNING)  # was 20
        assert "database down" in lines(logging.WARNING)[0]
        # A long episode is summed up once a minute, with its count.
        clock.now += 30.0
        await refresh(0, failing)
        clock.now += 31.0
        await refresh(2, failing)
        assert len(lines(logging.WARNING)) == 2
        assert (
            "21 more in the last 61s (22 since the episode began 61s ago)"
            in (lines(logging.WARNING)[1])
        )
        # A success after a quiet minute ends it, with the total.
        clock.now += 61.0
        working.value = "newer"
        await refresh(1, working, stale="new")
        (ended,) = [line for line in lines(logging.INFO) if "work again" in line]
        assert "22 failed over 61s" in ended
        assert c.statistics().refresh_errors == 22
