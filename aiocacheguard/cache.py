"""
`Cache`: the facade users hold. `Cache.get_or_load` composes the guards in one fixed order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, Final, Self, TypeVar, cast

from ._types import Key, Serializer
from .backend import RedisBackend, RedisClient
from .errors import (
    BackendError,
    CacheClosedError,
    ConfigurationError,
    LoadTimeout,
    LockTimeout,
)
from .guards.bloom import BloomFilter
from .guards.lock import (
    INLINE_LIMIT,
    STORE_AND_RELEASE,
    UNLINK_AND_RELEASE,
    Attempt,
    Outcome,
    RebuildLock,
)
from .guards.notify import FillNotifier
from .guards.refresh import Refresher, xfetch_due
from .guards.singleflight import SingleFlight
from .keys import KeySpace
from .metrics import Counters, Event, EventKind, Hook, Statistics
from .policy import Policy
from .record import HEADER_SIZE, Record, RecordError
from .serializers import JsonSerializer

__all__ = ("Cache",)

logger = logging.getLogger("aiocacheguard")

T = TypeVar("T")

#: The default budget of one Redis command, in seconds. redis-py's own defaults wait about a
#: minute on a blackholed server; a cache that is slower than its database is worse than none.
DEFAULT_COMMAND_TIMEOUT: Final = 1.0

#: Added to a holder's remaining lease before a waiter re-checks for a takeover, so the
#: re-check lands just after the lock expired rather than just before.
LEASE_SLACK: Final = 0.01


class _Entry:
    """A record read from Redis, with its payload decoded once for every caller."""

    __slots__ = ("header", "record", "value")

    def __init__(self, record: Record, value: Any, header: bytes) -> None:
        self.record = record
        self.value = value
        self.header = header  # identifies this stored copy (see record.HEADER_SIZE)

    def result(self) -> Any:
        """What a caller gets: the value, or None for a negative record."""
        return None if self.record.negative else self.value


class Cache:
    """
    A namespaced cache on a ``redis.asyncio`` client that guards the loader behind it.

    Args:
        client: A ready ``redis.asyncio.Redis`` (or ``RedisCluster``, or a Sentinel
            ``master_for`` client) created with ``decode_responses=False``. The Cache does not
            close it: you own it.
        namespace: Prefix of every key, so caches of different data never collide.
        policy: The default `Policy` of every entry; `get_or_load` can override it per call.
        serializer: How values become bytes. Default `JsonSerializer`; pickle only if asked.
        command_timeout: Seconds one Redis command may take before it fails with
            `BackendTimeout`. Default 1 second.
        max_in_flight: Redis commands outstanding at once (see `RedisBackend`).
        max_refreshes: Background refreshes running at once; more are dropped until the next
            read asks again. Default 32.
        hook: Called with each `Event` (stale served, refresh failed or done), for metrics.
        clock: Wall-clock time in seconds, for expiry decisions. Every process sharing the
            Redis must agree on it; inject a fake one in tests.
        rng: Source of randomness for jitter and XFetch (seed it for reproducible runs).
        bloom: A `BloomFilter` guarding every miss of this Cache (a policy's own filter takes
            precedence). The Cache binds it to its client and namespace.

    Raises:
        ConfigurationError: an argument is out of range; the message says what is accepted.

    Example:
        >>> import asyncio, redis.asyncio as redis
        >>> from aiocacheguard import Cache, Policy
        >>> from aiocacheguard.testing import RedisServer
        >>> async def main(port: int) -> object:
        ...     client = redis.Redis(port=port)
        ...     async with Cache(client, namespace="doc", policy=Policy(ttl=30.0)) as cache:
        ...         async def load_board() -> list[str]:
        ...             return ["ada", "grace"]
        ...         board = await cache.get_or_load("leaderboard", load_board)
        ...         cached = await cache.get("leaderboard")
        ...     await client.aclose()
        ...     return board, cached
        >>> with RedisServer() as server:
        ...     asyncio.run(main(server.port))
        (['ada', 'grace'], ['ada', 'grace'])
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        namespace: str,
        policy: Policy,
        serializer: Serializer | None = None,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        max_in_flight: int | None = None,
        max_refreshes: int = 32,
        hook: Hook | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        bloom: BloomFilter | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ConfigurationError("policy", policy, "an aiocacheguard.Policy")
        serializer = JsonSerializer() if serializer is None else serializer
        if not isinstance(serializer, Serializer) or not 0 <= serializer.tag <= 255:
            raise ConfigurationError(
                "serializer", serializer, "an object with dumps, loads and a tag in 0..255"
            )
        if (
            isinstance(command_timeout, bool)
            or not isinstance(command_timeout, int | float)
            or not (math.isfinite(command_timeout) and 0 < command_timeout <= 60)
        ):
            raise ConfigurationError("command_timeout", command_timeout, "seconds in (0, 60]")
        if (
            isinstance(max_refreshes, bool)
            or not isinstance(max_refreshes, int)
            or (max_refreshes < 1)
        ):
            raise ConfigurationError("max_refreshes", max_refreshes, "an integer >= 1")
        self.keys = KeySpace(namespace)
        self.policy = policy
        self.serializer = serializer
        self._backend = RedisBackend(
            client, command_timeout=float(command_timeout), max_in_flight=max_in_flight
        )
        self._counters = Counters()
        self._reads: SingleFlight[bytes, _Entry | None] = SingleFlight(name="read")
        self._loads: SingleFlight[bytes, Any] = SingleFlight(name="load")
        self._refresher: Refresher[bytes] = Refresher(max_concurrent=max_refreshes)
        self._hook = hook
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        if bloom is not None and not isinstance(bloom, BloomFilter):
            raise ConfigurationError("bloom", bloom, "an aiocacheguard.BloomFilter or None")
        self.bloom = bloom
        if bloom is not None:
            bloom.bind(self._backend, namespace=self.keys.namespace)
        self._notifier = FillNotifier()
        self._notifier.bind(self._backend.subscriber(self._notifier.deliver))
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Cache namespace={self.keys.namespace!r} {self.policy!r} {state}>"

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, drain: bool = False) -> None:
        """
        Stop all work and wait for it to finish. Idempotent.

        Flights in progress are cancelled (callers still waiting get `CacheClosedError`).
        Background refreshes are cancelled too, or, with ``drain=True``, awaited first (each is
        bounded by its policy's ``load_timeout``). No task of the Cache outlives this call.
        The Redis client is left open: you own it.
        """
        if self._closed:
            return
        self._closed = True
        await self._refresher.aclose(drain=drain)
        await self._loads.aclose()
        await self._reads.aclose()
        await self._backend.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("this Cache was closed with aclose(); create a new one")

    # -- public operations ---------------------------------------------------------------

    def statistics(self) -> Statistics:
        """A frozen snapshot of the counters (see `Statistics`)."""
        return self._counters.snapshot(redis_errors=self._backend.errors)

    async def get(self, key: Key, default: Any = None) -> Any:
        """
        The cached value of ``key``, or ``default`` when nothing usable is cached.

        A cached negative result (a loader's ``None``) returns ``None``, not ``default``: pass
        a sentinel as ``default`` to tell the two apart. A value past its soft TTL is still
        returned (no refresh is started: `get` has no loader); one past its TTL is not.
        Concurrent gets of one key share one Redis read.

        Raises:
            InvalidKeyError: the key is empty, too long or not str/bytes.
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        if rkey in self._reads:
            self._counters.coalesced += 1
        entry = await self._reads.run(rkey, lambda: self._read(rkey))
        if entry is None or self._clock() >= entry.record.expires_at:
            return default
        return entry.result()

    async def set(self, key: Key, value: Any, *, ttl: float | None = None) -> None:
        """
        Store ``value`` under ``key`` for ``ttl`` seconds (default: the Cache policy's ttl,
        with its soft TTL, jitter and stale_if_error).

        ``None`` is stored as a negative result. Callers that start after this returns read
        the new value, never an older read that was still in flight. A rebuild of the key in
        progress anywhere is superseded: its fill is refused, and its waiters read this value.

        Raises:
            ConfigurationError: ``ttl`` is out of range.
            SerializationError: the serializer cannot encode ``value``.
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        if ttl is None:
            policy = self.policy
            if value is None and policy.negative_ttl is None:  # an explicit None is stored
                policy = replace(policy, negative_ttl=policy.ttl)
        else:
            policy = Policy(ttl=ttl, negative_ttl=ttl, jitter=0.0)
        written = self._encode(value, policy, compute_time=0.0)
        assert written is not None
        data, redis_ttl = written
        await self._store(
            rkey, data, redis_ttl, self._filter(policy) if value is not None else None
        )
        self._detach(rkey)

    async def delete(self, key: Key) -> bool:
        """
        Remove ``key``; returns whether it was cached.

        A rebuild of the key in progress anywhere loses its lock, so a value loaded from data
        older than this invalidation is never written; its waiters load afresh.

        Raises:
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        removed = await self._backend.eval(
            UNLINK_AND_RELEASE, (rkey, self.keys.lock(rkey)), (self.keys.channel(rkey),)
        )
        self._detach(rkey)
        return bool(removed)

    async def get_or_load(
        self,
        key: Key,
        loader: Callable[[], Awaitable[T]],
        *,
        policy: Policy | None = None,
    ) -> T:
        """
        The cached value of ``key``; on a miss, ``await loader()`` once and cache its result.

        Concurrent calls for one key in this process share one flight, which covers the Redis
        read as well as the loader: 1,000 concurrent calls send one GET and call the loader at
        most once. A caller that is cancelled leaves the flight running for the others; when
        every caller is cancelled the loader is cancelled too.

        On a miss, with ``policy.lock`` (the default), the flight takes the distributed rebuild
        lock first, so one process of the deployment calls the loader while the others wait
        for its fill notification (`aiocacheguard.guards.lock`, `aiocacheguard.guards.notify`).
        A holder that dies is taken over within ``policy.lock_ttl``; a waiter never returns
        empty-handed: after ``policy.wait_timeout`` it calls the loader itself, or raises
        `LockTimeout` if ``policy.on_wait_timeout == "raise"``.

        Past ``policy.soft_ttl`` (or earlier, by XFetch's draw with ``policy.early_beta``) the
        value is returned at once and one background refresh is started; across processes
        the lock makes it one refresh. With ``policy.stale_if_error``, a value past its TTL is
        still returned if the loader fails.

        A loader returning ``None`` means "absent": it is cached for ``policy.negative_ttl``.
        If Redis fails, the value is loaded without it (counted in ``redis_errors``): the
        flight still protects the loader from concurrent calls.

        Args:
            key: str or bytes, at most `aiocacheguard.keys.MAX_KEY_BYTES` bytes.
            loader: An async function of no arguments, e.g. a database query.
            policy: Overrides the Cache's policy for this flight (the first caller's wins).

        Raises:
            InvalidKeyError: the key is empty, too long or not str/bytes.
            SerializationError: the loader's value cannot be encoded.
            CacheClosedError: the Cache was closed before or during the call.
            LoadTimeout: the loader ran past ``policy.load_timeout``.
            LockTimeout: waiting ran out and ``policy.on_wait_timeout == "raise"``.
            Exception: whatever the loader raised, to every caller of the flight.
        """
        self._check_open()
        rkey = self.keys.value(key)
        flight_policy = self._call_policy(policy, loader)
        if rkey in self._loads:
            self._counters.coalesced += 1
        value = await self._loads.run(rkey, lambda: self._load(rkey, loader, flight_policy))
        return cast(T, value)

    async def refresh(
        self,
        key: Key,
        loader: Callable[[], Awaitable[T]],
        *,
        policy: Policy | None = None,
    ) -> T:
        """
        Load ``key`` again now, whatever is cached, write it, and return the new value.

        Joins a refresh of the key already running in this process; if another process holds
        the rebuild lock, waits for its fill and returns that instead of loading twice.

        Raises:
            The same as `get_or_load`.
        """
        self._check_open()
        rkey = self.keys.value(key)
        refresh_policy = self._call_policy(policy, loader)
        value = await self._refresher.run(
            rkey, lambda: self._refresh(rkey, loader, refresh_policy, replacing=None)
        )
        return cast(T, value)

    def _call_policy(self, policy: Policy | None, loader: object) -> Policy:
        """The policy of a call, checking its arguments before any I/O."""
        if not callable(loader):
            raise ConfigurationError("loader", loader, "an async function of no arguments")
        if policy is None:
            return self.policy
        if not isinstance(policy, Policy):
            raise ConfigurationError("policy", policy, "an aiocacheguard.Policy or None")
        return policy

    # -- the flight -----------------------------------------------------------------------

    async def _load(self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy) -> T:
        try:
            entry = await self._reads.run(rkey, lambda: self._read(rkey))
        except BackendError:
            # Carry on without Redis: the loader is still single-flighted in this process.
            return await self._call_loader(rkey, loader, policy)
        stale: _Entry | None = None
        if entry is not None:
            record = entry.record
            now = self._clock()
            if now < record.expires_at:
                self._maybe_refresh(rkey, entry, loader, policy, now)
                return cast(T, entry.result())
            stale = entry  # past its TTL, kept by Redis only for stale_if_error
        elif not await self._may_exist(rkey, policy):
            return cast(T, None)  # the Bloom filter says it exists nowhere
        try:
            if not policy.lock:
                return await self._load_unlocked(rkey, loader, policy)
            return await self._rebuild(rkey, loader, policy, replacing=stale)
        except Exception as exc:
            if stale is None or not self._within_stale_if_error(stale, policy):
                raise
            self._counters.stale_served += 1
            self._emit("stale_served", rkey, exc)
            return cast(T, stale.result())

    def _filter(self, policy: Policy) -> BloomFilter | None:
        bloom = policy.bloom or self.bloom
        if bloom is not None and not bloom.bound:
            bloom.bind(self._backend, namespace=self.keys.namespace)
        return bloom

    async def _may_exist(self, rkey: bytes, policy: Policy) -> bool:
        """False only if the Bloom filter says the key was never added; fails open."""
        bloom = self._filter(policy)
        if bloom is None:
            return True
        try:
            answer = await bloom.check(self.keys.user_key(rkey))
        except BackendError:
            answer = -1
        if answer < 0:
            self._counters.bloom_fail_open += 1
            return True
        if answer == 0:
            self._counters.bloom_rejected += 1
            return False
        return True

    def _within_stale_if_error(self, entry: _Entry, policy: Policy) -> bool:
        grace = policy.stale_if_error
        return grace is not None and self._clock() < entry.record.expires_at + grace

    def _maybe_refresh(
        self,
        rkey: bytes,
        entry: _Entry,
        loader: Callable[[], Awaitable[Any]],
        policy: Policy,
        now: float,
    ) -> None:
        """Start a background refresh if the entry is soft-expired or XFetch draws one."""
        record = entry.record
        if record.negative:
            return
        soft = record.soft_expires_at
        early = False
        if soft is not None and now >= soft:
            self._counters.stale_served += 1
        elif policy.early_beta > 0 and xfetch_due(
            now=now,
            expiry=record.expires_at if soft is None else soft,
            delta=record.compute_time,
            beta=policy.early_beta,
            rng=self._rng,
        ):
            early = True
        else:
            return
        if (
            self._refresher.schedule(
                rkey, lambda: self._refresh_in_background(rkey, loader, policy, entry)
            )
            and early
        ):
            self._counters.early_refreshes += 1

    async def _refresh_in_background(
        self, rkey: bytes, loader: Callable[[], Awaitable[Any]], policy: Policy, seen: _Entry
    ) -> Any:
        try:
            return await self._refresh(rkey, loader, policy, replacing=seen)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Never raised into a caller: the stale value stays served. Said three ways.
            self._counters.refresh_errors += 1
            logger.warning("background refresh of %r failed: %r", rkey, exc)
            self._emit("refresh_failed", rkey, exc)
            raise

    async def _refresh(
        self,
        rkey: bytes,
        loader: Callable[[], Awaitable[T]],
        policy: Policy,
        *,
        replacing: _Entry | None,
    ) -> T:
        """
        Reload ``rkey`` whatever is cached (``replacing=None``), or unless the copy ``replacing``
        was already replaced by someone else; returns the value now cached.
        """
        if not policy.lock:
            value = await self._load_unlocked(rkey, loader, policy)
        else:
            lock = self._lock(rkey, policy)
            if replacing is None:
                attempt = await lock.acquire_or_read(force=True)
            else:
                attempt = await lock.acquire_or_read(replacing=replacing.header)
            if attempt.outcome is Outcome.VALUE:
                entry = self._decode(attempt.value)
                if entry is not None:
                    self._detach(rkey)
                    return cast(T, entry.result())  # another process refreshed it first
                attempt = await lock.acquire_or_read(replacing=attempt.value[:HEADER_SIZE])
            if attempt.outcome is Outcome.BUSY:
                if replacing is not None:
                    return cast(T, replacing.result())  # another process is refreshing it
                return await self._rebuild(rkey, loader, policy, replacing=None, lock=lock)
            value = await self._load_as_holder(lock, loader, policy)
        self._counters.refreshes += 1
        self._emit("refreshed", rkey)
        self._detach(rkey)
        return value

    async def _read(self, rkey: bytes) -> _Entry | None:
        data = await self._backend.get(rkey)
        entry = None if data is None else self._decode(data)
        counters = self._counters
        if entry is None:
            counters.misses += 1
        elif entry.record.negative:
            counters.negative_hits += 1
        else:
            counters.hits += 1
        return entry

    def _decode(self, data: bytes) -> _Entry | None:
        """The entry stored as ``data``; None (and counted) when it is foreign or corrupt."""
        try:
            record = Record.decode(data)
            if record.serializer_tag != self.serializer.tag:
                raise RecordError(f"written with serializer tag {record.serializer_tag}")
            value = None if record.negative else self.serializer.loads(record.payload)
        except Exception:
            # Foreign, corrupt or differently serialized bytes: a miss that the fill overwrites.
            self._counters.decode_errors += 1
            return None
        return _Entry(record, value, data[:HEADER_SIZE])

    async def _call_loader(
        self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy
    ) -> T:
        counters = self._counters
        counters.loader_calls += 1
        started = time.monotonic()
        error: BaseException | None = None
        try:
            pending = loader()
            if not inspect.isawaitable(pending):
                raise ConfigurationError(
                    "loader", loader, "an async function: it returned a non-awaitable"
                )
            if policy.load_timeout is None:
                return await pending
            async with asyncio.timeout(policy.load_timeout) as scope:
                return await pending
        except TimeoutError as exc:
            counters.loader_errors += 1
            error = exc
            if policy.load_timeout is not None and scope.expired():
                error = LoadTimeout(
                    f"the loader ran longer than load_timeout={policy.load_timeout}s and was "
                    "cancelled; raise Policy.load_timeout if it is legitimately slow"
                )
                raise error from None
            raise
        except Exception as exc:
            counters.loader_errors += 1
            error = exc
            raise
        finally:
            if self._hook is not None:
                self._emit("loaded", rkey, error, duration=time.monotonic() - started)

    async def _load_unlocked(
        self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy
    ) -> T:
        started = time.monotonic()
        value = await self._call_loader(rkey, loader, policy)
        written = self._encode(value, policy, compute_time=time.monotonic() - started)
        if written is not None:
            with contextlib.suppress(BackendError):  # counted; the value is still served
                bloom = self._filter(policy) if value is not None else None
                await self._store(rkey, *written, bloom)
        return value

    def _lock(self, rkey: bytes, policy: Policy) -> RebuildLock:
        return RebuildLock(
            self._backend,
            value_key=rkey,
            lock_key=self.keys.lock(rkey),
            channel=self.keys.channel(rkey),
            lock_ttl=policy.lock_ttl,
        )

    async def _rebuild(
        self,
        rkey: bytes,
        loader: Callable[[], Awaitable[T]],
        policy: Policy,
        *,
        replacing: _Entry | None,
        lock: RebuildLock | None = None,
    ) -> T:
        """
        The miss path across processes: take the lock and load, or wait for the fill.
        ``replacing`` is an expired copy the lock may be taken over (unless replaced since).
        """
        lock = self._lock(rkey, policy) if lock is None else lock
        self._notifier.prepare()  # if this miss must wait, its connection is on the way
        try:
            attempt, entry = await self._acquire(
                lock, replacing=None if replacing is None else replacing.header
            )
            if attempt.outcome is Outcome.BUSY:
                self._counters.lock_waits += 1
                attempt, entry = await self._wait_for_fill(lock, policy)
        except BackendError:
            return await self._call_loader(rkey, loader, policy)  # Redis failed mid-way: no guard
        if entry is not None:
            return cast(T, entry.result())
        if attempt.outcome is Outcome.ACQUIRED:
            return await self._load_as_holder(lock, loader, policy)
        if attempt.outcome is Outcome.BUSY and policy.on_wait_timeout == "raise":
            raise LockTimeout(
                f"waited wait_timeout={policy.wait_timeout}s for another process to fill the "
                "key; raise Policy.wait_timeout, or use on_wait_timeout='load'"
            )
        return await self._call_loader(rkey, loader, policy)

    async def _acquire(
        self, lock: RebuildLock, *, replacing: bytes | None
    ) -> tuple[Attempt, _Entry | None]:
        """
        One lock attempt. A value found instead is returned decoded if it is usable: not
        corrupt (else the lock is taken over it), and not the expired copy being replaced.
        """
        for _ in range(3):  # a value that keeps being replaced by unusable ones: give up
            attempt = await lock.acquire_or_read(replacing=replacing)
            if attempt.outcome is not Outcome.VALUE:
                return attempt, None
            entry = self._decode(attempt.value)
            if entry is not None and self._clock() < entry.record.expires_at:
                return attempt, entry
            replacing = attempt.value[:HEADER_SIZE]  # corrupt or expired: take the lock over it
        return attempt, None

    async def _wait_for_fill(
        self, lock: RebuildLock, policy: Policy
    ) -> tuple[Attempt, _Entry | None]:
        """
        Wait for another process's fill, re-checking on every notification and whenever the
        holder's lease may have run out (then the lock is taken over).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.wait_timeout
        async with self._notifier.listen(lock.channel) as signal:
            notified = True  # the first check, right after subscribing, is not a takeover
            while True:
                attempt, entry = await self._acquire(lock, replacing=None)
                if entry is not None:
                    return attempt, entry
                if attempt.outcome is Outcome.ACQUIRED:
                    if not notified:
                        self._counters.takeovers += 1
                        self._emit("takeover", lock.value_key)
                    return attempt, None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return attempt, None
                notified = await signal.wait_notified(
                    min(remaining, attempt.lease_left + LEASE_SLACK)
                )
                filled = signal.take()
                if filled:  # the fill message carried the record: no read needed
                    entry = self._decode(filled)
                    if entry is not None and self._clock() < entry.record.expires_at:
                        return Attempt(Outcome.VALUE, value=filled), entry

    async def _load_as_holder(
        self, lock: RebuildLock, loader: Callable[[], Awaitable[T]], policy: Policy
    ) -> T:
        self._counters.lock_acquired += 1
        started = time.monotonic()
        try:
            async with lock.kept_alive():
                value = await self._call_loader(lock.value_key, loader, policy)
        except BaseException:
            # Wake the waiters now (they retry) rather than after the lease runs out.
            with contextlib.suppress(BackendError):
                await asyncio.shield(lock.release())
            raise
        written = self._encode(value, policy, compute_time=time.monotonic() - started)
        bloom = self._filter(policy) if value is not None else None
        try:
            if written is None:
                await lock.release()
            else:
                filled, _ = await asyncio.gather(
                    lock.fill(*written), self._add_to_filter(lock.value_key, bloom)
                )
                if not filled:
                    self._counters.lock_lost += 1
                    self._emit("lock_lost", lock.value_key)
        except BackendError:
            pass  # counted; the value is still served to this process's callers
        return value

    # -- helpers --------------------------------------------------------------------------

    def _encode(
        self, value: Any, policy: Policy, *, compute_time: float
    ) -> tuple[bytes, float] | None:
        """
        The record bytes of ``value`` and their Redis TTL; None when the policy does not cache
        it (a negative result with ``negative_ttl=None``).

        TTLs are shortened by one random fraction up to ``policy.jitter`` (soft TTL alike), and
        Redis keeps values ``stale_if_error`` longer than their logical expiry.
        """
        negative = value is None
        ttl = policy.negative_ttl if negative else policy.ttl
        if ttl is None:
            return None
        spread = 1.0 - policy.jitter * self._rng.random() if policy.jitter else 1.0
        ttl *= spread
        soft_ttl = None if negative or policy.soft_ttl is None else policy.soft_ttl * spread
        now = self._clock()
        record = Record(
            payload=b"" if negative else self.serializer.dumps(value),
            negative=negative,
            serializer_tag=self.serializer.tag,
            stored_at=now,
            expires_at=now + ttl,
            soft_expires_at=None if soft_ttl is None else now + soft_ttl,
            compute_time=compute_time,
        )
        grace = 0.0 if negative or policy.stale_if_error is None else policy.stale_if_error
        return record.encode(), ttl + grace

    async def _store(
        self, rkey: bytes, data: bytes, ttl: float, bloom: BloomFilter | None = None
    ) -> None:
        """Write a record (superseding any rebuild) and add its key to ``bloom``, together."""
        await asyncio.gather(
            self._backend.eval(
                STORE_AND_RELEASE,
                (rkey, self.keys.lock(rkey)),
                (data, max(1, round(ttl * 1000)), self.keys.channel(rkey), INLINE_LIMIT),
            ),
            self._add_to_filter(rkey, bloom),
        )

    async def _add_to_filter(self, rkey: bytes, bloom: BloomFilter | None) -> None:
        if bloom is not None:
            await bloom.add(self.keys.user_key(rkey))

    def _detach(self, rkey: bytes) -> None:
        """After a write, later callers must not join a flight that began before it."""
        self._reads.forget(rkey)
        self._loads.forget(rkey)

    def _emit(
        self,
        kind: EventKind,
        rkey: bytes,
        error: BaseException | None = None,
        *,
        duration: float | None = None,
    ) -> None:
        if self._hook is None:
            return
        try:
            self._hook(Event(kind, rkey, error, duration))
        except Exception:
            logger.exception("the Cache's event hook raised; ignored")
