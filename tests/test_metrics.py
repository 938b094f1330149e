"""Statistics snapshots, the event hook, and the Prometheus and OpenTelemetry glue."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
import redis.asyncio as redis

from aiocacheguard import Cache, Event, Policy, Statistics
from aiocacheguard.metrics import PrometheusCollector, instrument_opentelemetry

from .helpers import GatedLoader

CONTRACT_FIELDS = {
    "hits", "misses", "stale_served", "negative_hits", "coalesced", "loader_calls",
    "loader_errors", "lock_acquired", "lock_waits", "takeovers", "refreshes",
    "refresh_errors", "decode_errors", "redis_errors",
}  # fmt: skip


def test_statistics_is_a_frozen_snapshot_with_the_contract_fields() -> None:
    names = {f.name for f in dataclasses.fields(Statistics)}
    assert names >= CONTRACT_FIELDS
    stats = Statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.hits = 1  # type: ignore[misc]


async def test_snapshot_does_not_move(cache: Cache) -> None:
    async def load() -> int:
        return 1

    before = cache.statistics()
    await cache.get_or_load("k", load)
    assert before.loader_calls == 0 and cache.statistics().loader_calls == 1


async def test_hook_sees_loads_takeovers_and_lost_locks(
    client: redis.Redis, namespace: str
) -> None:
    events: list[Event] = []
    policy = Policy(ttl=30.0, lock_ttl=0.2)
    stuck = GatedLoader("late")

    async def fast() -> str:
        return "fresh"

    async with (
        Cache(client, namespace=namespace, policy=policy, hook=events.append) as a,
        Cache(client, namespace=namespace, policy=policy, hook=events.append) as b,
    ):
        holder = asyncio.create_task(a.get_or_load("k", stuck))
        await stuck.started.wait()
        a_lock = a.keys.lock(a.keys.value("k"))
        # The holder stalls: renewal can't help if its lock is gone.
        await client.delete(a_lock)
        await client.set(a_lock, "someone else", px=100)  # a holder that then dies
        assert await b.get_or_load("k", fast) == "fresh"
        stuck.release.set()
        assert await holder == "late"
    kinds = [e.kind for e in events]
    assert "takeover" in kinds and "lock_lost" in kinds
    loaded = [e for e in events if e.kind == "loaded"]
    assert len(loaded) == 2 and all(e.duration is not None for e in loaded)


async def test_a_failing_hook_is_logged_not_raised(
    client: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("metrics backend down")

    async def load() -> int:
        return 1

    async with Cache(client, namespace=namespace, policy=Policy(ttl=5.0), hook=broken) as cache:
        with caplog.at_level(logging.ERROR, logger="aiocacheguard"):
            assert await cache.get_or_load("k", load) == 1
    assert "event hook raised" in caplog.text


async def test_prometheus_collector(cache: Cache) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    PrometheusCollector(cache, registry=registry)

    async def load() -> int:
        return 1

    await cache.get_or_load("k", load)
    await cache.get_or_load("k", load)
    text = generate_latest(registry).decode()
    assert f'aiocacheguard_loader_calls_total{{namespace="{cache.namespace}"}} 1.0' in text
    assert f'aiocacheguard_hits_total{{namespace="{cache.namespace}"}} 1.0' in text


async def test_opentelemetry_counters(cache: Cache) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrument_opentelemetry(cache, meter=provider.get_meter("test"))

    async def load() -> int:
        return 1

    await cache.get_or_load("k", load)
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        metric.name: getattr(point, "value", None)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    }
    assert points["aiocacheguard.loader_calls"] == 1
    assert points["aiocacheguard.misses"] == 1
    provider.shutdown()
