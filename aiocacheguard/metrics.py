"""Statistics: plain counters kept by the Cache, read as a frozen snapshot."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol, TypeAlias

__all__ = (
    "Event",
    "Hook",
    "PrometheusCollector",
    "Statistics",
    "StatisticsSource",
    "instrument_opentelemetry",
)

logger = logging.getLogger("aiocacheguard")

EventKind: TypeAlias = Literal[
    "loaded",
    "stale_served",
    "refresh_failed",
    "refreshed",
    "takeover",
    "lock_lost",
    "breaker_opened",
    "breaker_half_open",
    "breaker_closed",
]


@dataclass(frozen=True, slots=True)
class Event:
    """
    Something worth a metric or a log line, handed to the Cache's hook as it happens.

    Attributes:
        kind: ``"loaded"``: a loader call finished (``duration``; ``error`` if it raised);
            ``"stale_served"``: a value past its expiry was served because the loader failed
            (``Policy.stale_if_error``); ``"refresh_failed"``: a background refresh failed,
            the stale value stays; ``"refreshed"``: a refresh wrote a new value;
            ``"takeover"``: this process took a rebuild lock whose holder's lease had run
            out; ``"lock_lost"``: a fill was refused because the lock had passed on;
            ``"breaker_opened"``, ``"breaker_half_open"``, ``"breaker_closed"``: the circuit
            breaker in front of Redis changed state (``key`` is ``b""``; on a Redis Cluster,
            ``node`` says which primary's breaker).
        key: The Redis key of the entry.
        error: The loader's exception, where there is one.
        duration: Seconds the loader ran, for ``"loaded"``.
        node: ``host:port`` of the Redis Cluster primary whose circuit breaker changed state;
            None for the breaker of Redis as a whole, and for other events.
    """

    kind: EventKind
    key: bytes
    error: BaseException | None = None
    duration: float | None = None
    node: str | None = None


class Hook(Protocol):
    """Called synchronously with each `Event`; exceptions it raises are logged and ignored."""

    def __call__(self, event: Event, /) -> None: ...


class Emitter:
    """Hands `Event`s to a hook, if there is one; a hook that raises is logged, not raised."""

    __slots__ = ("_hook",)

    def __init__(self, hook: Hook | None) -> None:
        self._hook = hook

    def __call__(
        self,
        kind: EventKind,
        key: bytes,
        error: BaseException | None = None,
        *,
        duration: float | None = None,
        node: str | None = None,
    ) -> None:
        if self._hook is None:
            return
        try:
            self._hook(Event(kind, key, error, duration, node))
        except Exception:
            logger.exception("the Cache's event hook raised; ignored")

    def breaker_moved(self, old: Any, new: Any, node: str | None = None) -> None:
        """A circuit breaker's ``on_transition``: each change as an event (key ``b""``)."""
        self(_BREAKER_EVENTS[new.value], b"", node=node)


_BREAKER_EVENTS: dict[str, EventKind] = {
    "open": "breaker_opened",
    "half_open": "breaker_half_open",
    "closed": "breaker_closed",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Statistics:
    """
    A snapshot of a Cache's counters since it was created.

    Reads of Redis are counted once per flight, not once per caller: when 1,000 callers share
    one flight that misses, ``misses`` grows by 1 and ``coalesced`` by 999.

    Attributes:
        hits: Flights that found a fresh value in Redis.
        misses: Flights that found nothing usable in Redis (absent, corrupt or foreign bytes).
        negative_hits: Flights that found a cached "absent" (a loader's ``None``).
        coalesced: Callers that joined a flight another caller had started.
        loader_calls: Times a loader was called.
        loader_errors: Times a loader raised (nothing was cached from it).
        lock_acquired: Rebuild locks this process took (it then called the loader).
        lock_waits: Flights that found another process rebuilding and waited for its fill.
        stale_served: Flights that returned a value past its TTL because the loader failed
            (``Policy.stale_if_error``); each is also a ``"stale_served"`` event.
        soft_expired_served: Reads (once per flight, like ``hits``) that found a value past
            its soft TTL (logical expiry): served, and ``get_or_load`` asked for a background
            refresh.
        refreshes: Background or forced refreshes that wrote a new value.
        refresh_errors: Refreshes whose loader failed or timed out (the stale value stayed).
        early_refreshes: Refreshes started early by XFetch (also counted in ``refreshes``
            once they succeed).
        bloom_rejected: Misses the Bloom filter answered "definitely absent": the loader was
            not called and ``None`` was returned.
        bloom_fail_open: Bloom checks that failed (Redis error, or the filter's bitmap is
            missing) and let the loader be asked.
        takeovers: Locks taken after the previous holder's lease ran out without a fill
            (the holder died or stalled).
        lock_lost: Fills refused because the lease had passed to another holder, or a
            ``set``/``delete`` superseded the rebuild; the value was still returned locally.
        decode_errors: Records that could not be decoded and were treated as a miss.
        values_too_large: Records larger than the Cache's ``max_value_bytes``: a ``set``
            refused with `ValueTooLargeError`, a loaded value served but not cached, or a
            stored record found on read and treated as a miss (not decoded).
        forged_records: Records refused because they were not signed for their key with the
            Cache's ``signing_key`` or ``verify_keys`` (unsigned, tampered, or signed with
            another key): treated as a miss, their payload never decoded; one warning per
            episode. Always 0 without a ``signing_key``.
        redis_errors: Redis commands that failed or ran out of time.
        pubsub_renewals: Times the fill notifications' pub/sub connection was found silent
            (open, but its health PING unanswered) and replaced; its waiters re-checked Redis.
        notify_fallbacks: Waits for another process's fill that had no pub/sub subscription
            (refused, or the connection failed) and re-checked at the holder's lease instead.
        breaker_opened: Times the circuit breaker opened (Redis unreachable).
        short_circuited: Redis calls refused at once because the breaker was open.
        writes_refused: Writes Redis answered with an error (OOM under noeviction, READONLY
            after a failover); the loaded value was still served.
        permission_errors: Commands, keys, channels or credentials Redis refused this
            Cache's user (NOPERM, a wrong password: `PermissionDeniedError`), a fill's PUBLISH
            it refused, and permissions the start-up check (``ACL DRYRUN``) found missing.
            A configuration error, not a failure of Redis: the breaker does not count it; one
            WARNING per episode names what was refused.
        unwritten_loads: Loads whose value could not be written to Redis (unreachable).
        replica_reads: Reads served by the replica because the primary failed.
        bulkhead_timeouts: Loads that found ``max_concurrent_loads`` loaders running for
            ``wait_timeout`` and raised `LoadTimeout` (or served the stale value).
        bloom_add_errors: Bloom filter additions that failed; the filter keeps the keys in
            memory, answers "maybe" for them and adds them with its next successful write.
        local_hits: Reads served by the L1 (``Cache(local=...)``) without I/O; not counted in
            ``hits``, which are reads of Redis.
        local_evictions: L1 entries removed to stay within its ``max_entries`` / ``max_bytes``.
        invalidations: Keys the L1 was told changed (announced by Redis, or written by this
            process), plus flushes; counted whether or not it held them.
        local_bypassed: Times the L1 stopped serving because an invalidation listener
            stopped listening, for any reason (its connection lost or silent, an error it did
            not expect, its task ending); it serves again once tracking is restored.
        loads_running: Now (a gauge, not a count): bulkhead slots taken, each by a top-level
            load and the loads it caused (``max_concurrent_loads``; 0 without a bulkhead).
        loads_waiting: Now (a gauge): loads waiting for a bulkhead slot.
    """

    hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    coalesced: int = 0
    loader_calls: int = 0
    loader_errors: int = 0
    stale_served: int = 0
    refreshes: int = 0
    refresh_errors: int = 0
    early_refreshes: int = 0
    bloom_rejected: int = 0
    bloom_fail_open: int = 0
    lock_acquired: int = 0
    lock_waits: int = 0
    takeovers: int = 0
    lock_lost: int = 0
    decode_errors: int = 0
    values_too_large: int = 0
    forged_records: int = 0
    redis_errors: int = 0
    pubsub_renewals: int = 0
    soft_expired_served: int = 0
    notify_fallbacks: int = 0
    bloom_add_errors: int = 0
    breaker_opened: int = 0
    short_circuited: int = 0
    writes_refused: int = 0
    permission_errors: int = 0
    unwritten_loads: int = 0
    replica_reads: int = 0
    bulkhead_timeouts: int = 0
    local_hits: int = 0
    local_evictions: int = 0
    invalidations: int = 0
    local_bypassed: int = 0
    loads_running: int = 0
    loads_waiting: int = 0


#: The fields of `Statistics` that are gauges (a level now), not counts since creation.
GAUGES = frozenset({"loads_running", "loads_waiting"})


class StatisticsSource(Protocol):
    """What the exporters read: a `Cache`, or anything with a namespace and statistics."""

    @property
    def namespace(self) -> str: ...

    def statistics(self) -> Statistics: ...


class Counters:
    """The mutable twin of `Statistics`; only the Cache writes to it."""

    __slots__ = tuple(f.name for f in fields(Statistics))

    hits: int
    misses: int
    negative_hits: int
    coalesced: int
    loader_calls: int
    loader_errors: int
    stale_served: int
    refreshes: int
    refresh_errors: int
    early_refreshes: int
    bloom_rejected: int
    bloom_fail_open: int
    lock_acquired: int
    lock_waits: int
    takeovers: int
    lock_lost: int
    decode_errors: int
    values_too_large: int
    forged_records: int
    redis_errors: int
    pubsub_renewals: int
    soft_expired_served: int
    notify_fallbacks: int
    bloom_add_errors: int
    breaker_opened: int
    short_circuited: int
    writes_refused: int
    permission_errors: int
    unwritten_loads: int
    replica_reads: int
    bulkhead_timeouts: int
    local_hits: int
    local_evictions: int
    invalidations: int
    local_bypassed: int
    loads_running: int
    loads_waiting: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self, **overrides: int) -> Statistics:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(overrides)
        return Statistics(**values)


class PrometheusCollector:
    """
    Exposes a Cache's `Statistics` to Prometheus (``pip install 'aiocacheguard[prometheus]'``).

    Every counter becomes ``<prefix>_<name>_total`` (a gauge of `GAUGES`: ``<prefix>_<name>``)
    with a ``namespace`` label, read from
    ``cache.statistics()`` at scrape time: nothing is done per request.

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> registry = CollectorRegistry()
        >>> PrometheusCollector(cache, registry=registry)  # doctest: +SKIP
    """

    def __init__(
        self, cache: StatisticsSource, *, registry: Any = None, prefix: str = "aiocacheguard"
    ) -> None:
        from prometheus_client import REGISTRY  # lazy: an optional extra

        self._cache = cache
        self._prefix = prefix
        (registry if registry is not None else REGISTRY).register(self)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = self._cache.statistics()
        for field in fields(Statistics):
            kind = GaugeMetricFamily if field.name in GAUGES else CounterMetricFamily
            family = kind(
                f"{self._prefix}_{field.name}",
                f"aiocacheguard Statistics.{field.name}",
                labels=["namespace"],
            )
            family.add_metric([self._cache.namespace], getattr(snapshot, field.name))
            yield family


def instrument_opentelemetry(
    cache: StatisticsSource, *, meter: Any = None, prefix: str = "aiocacheguard"
) -> None:
    """
    Report a Cache's `Statistics` as OpenTelemetry observable counters
    (``pip install 'aiocacheguard[otel]'``), read at each collection, with a ``namespace``
    attribute. ``meter`` defaults to ``metrics.get_meter("aiocacheguard")``.
    """
    from opentelemetry import metrics  # lazy: an optional extra

    meter = meter if meter is not None else metrics.get_meter("aiocacheguard")
    attributes = {"namespace": cache.namespace}

    def observe(name: str) -> Any:
        def callback(options: Any) -> Iterator[Any]:
            yield metrics.Observation(getattr(cache.statistics(), name), attributes)

        return callback

    for field in fields(Statistics):
        create = (
            meter.create_observable_gauge
            if field.name in GAUGES
            else meter.create_observable_counter
        )
        create(
            f"{prefix}.{field.name}",
            callbacks=[observe(field.name)],
            description=f"aiocacheguard Statistics.{field.name}",
        )
