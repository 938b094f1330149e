"""
`Cache`: the facade users hold. `Cache.get_or_load` composes the guards in one fixed order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
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
from .guards.lock import (
    STORE_AND_RELEASE,
    UNLINK_AND_RELEASE,
    Attempt,
    Outcome,
    RebuildLock,
)
from .guards.notify import FillNotifier
from .guards.singleflight import SingleFlight
from .keys import KeySpace
from .metrics import Counters, Statistics
from .policy import Policy
from .record import Record, RecordError
from .serializers import JsonSerializer

__all__ = ("Cache",)

T = TypeVar("T")

#: The default budget of one Redis command, in seconds. redis-py's own defaults wait about a
#: minute on a blackholed server; a cache that is slower than its database is worse than none.
DEFAULT_COMMAND_TIMEOUT: Final = 1.0

#: Added to a holder's remaining lease before a waiter re-checks for a takeover, so the
#: re-check lands just after the lock expired rather than just before.
LEASE_SLACK: Final = 0.01


class _Entry:
    """A record read from Redis, with its payload decoded once for every caller."""

    __slots__ = ("record", "value")

    def __init__(self, record: Record, value: Any) -> None:
        self.record = record
        self.value = value

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

    Raises:
        ConfigurationError: an argument is out of range; the message says what is accepted.

    Example:
        >>> import asyncio, redis.asyncio as redis
        >>> from aiocacheguard import Cache, Policy
        >>> from aiocacheguard.server import RedisServer
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
        self.keys = KeySpace(namespace)
        self.policy = policy
        self.serializer = serializer
        self._backend = RedisBackend(
            client, command_timeout=float(command_timeout), max_in_flight=max_in_flight
        )
        self._counters = Counters()
        self._reads: SingleFlight[bytes, _Entry | None] = SingleFlight(name="read")
        self._loads: SingleFlight[bytes, Any] = SingleFlight(name="load")
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

    async def aclose(self) -> None:
        """
        Cancel every flight in progress and wait for it to finish. Idempotent.

        Callers still waiting get `CacheClosedError`. The Redis client is left open.
        """
        if self._closed:
            return
        self._closed = True
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
        a sentinel as ``default`` to tell the two apart. Concurrent gets of one key share one
        Redis read.

        Raises:
            InvalidKeyError: the key is empty, too long or not str/bytes.
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        if rkey in self._reads:
            self._counters.coalesced += 1
        entry = await self._reads.run(rkey, lambda: self._read(rkey))
        return default if entry is None else entry.result()

    async def set(self, key: Key, value: Any, *, ttl: float | None = None) -> None:
        """
        Store ``value`` under ``key`` for ``ttl`` seconds (default: the Cache policy's ttl).

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
        policy = self.policy if ttl is None else Policy(ttl=ttl, negative_ttl=ttl)
        ttl = self._ttl_for(value, policy) or policy.ttl  # an explicit None is always stored
        await self._store(rkey, self._encode(value, policy, ttl=ttl, compute_time=0.0), ttl)
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
        flight_policy = self.policy if policy is None else policy
        if rkey in self._loads:
            self._counters.coalesced += 1
        value = await self._loads.run(rkey, lambda: self._load(rkey, loader, flight_policy))
        return cast(T, value)

    # -- the flight -----------------------------------------------------------------------

    async def _load(self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy) -> T:
        try:
            entry = await self._reads.run(rkey, lambda: self._read(rkey))
        except BackendError:
            # Carry on without Redis: the loader is still single-flighted in this process.
            return await self._call_loader(loader, policy)
        if entry is not None:
            return cast(T, entry.result())
        if not policy.lock:
            return await self._load_unlocked(rkey, loader, policy)
        return await self._rebuild(rkey, loader, policy)

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
        return _Entry(record, value)

    async def _call_loader(self, loader: Callable[[], Awaitable[T]], policy: Policy) -> T:
        counters = self._counters
        counters.loader_calls += 1
        try:
            if policy.load_timeout is None:
                return await loader()
            async with asyncio.timeout(policy.load_timeout) as scope:
                return await loader()
        except TimeoutError:
            counters.loader_errors += 1
            if policy.load_timeout is not None and scope.expired():
                raise LoadTimeout(
                    f"the loader ran longer than load_timeout={policy.load_timeout}s and was "
                    "cancelled; raise Policy.load_timeout if it is legitimately slow"
                ) from None
            raise
        except Exception:
            counters.loader_errors += 1
            raise

    async def _load_unlocked(
        self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy
    ) -> T:
        started = time.monotonic()
        value = await self._call_loader(loader, policy)
        ttl = self._ttl_for(value, policy)
        if ttl is not None:
            data = self._encode(value, policy, ttl=ttl, compute_time=time.monotonic() - started)
            with contextlib.suppress(BackendError):  # counted; the value is still served
                await self._store(rkey, data, ttl)
        return value

    async def _rebuild(self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy) -> T:
        """The miss path across processes: take the lock and load, or wait for the fill."""
        lock = RebuildLock(
            self._backend,
            value_key=rkey,
            lock_key=self.keys.lock(rkey),
            channel=self.keys.channel(rkey),
            lock_ttl=policy.lock_ttl,
        )
        try:
            attempt, entry = await self._acquire(lock, ignore_value=False)
            if attempt.outcome is Outcome.BUSY:
                self._counters.lock_waits += 1
                attempt, entry = await self._wait_for_fill(lock, policy)
        except BackendError:
            return await self._call_loader(loader, policy)  # Redis failed mid-way: no guard
        if entry is not None:
            return cast(T, entry.result())
        if attempt.outcome is Outcome.ACQUIRED:
            return await self._load_as_holder(lock, loader, policy)
        if policy.on_wait_timeout == "raise":
            raise LockTimeout(
                f"waited wait_timeout={policy.wait_timeout}s for another process to fill the "
                "key; raise Policy.wait_timeout, or use on_wait_timeout='load'"
            )
        return await self._call_loader(loader, policy)

    async def _acquire(
        self, lock: RebuildLock, *, ignore_value: bool
    ) -> tuple[Attempt, _Entry | None]:
        """One lock attempt; a value found instead is decoded (a corrupt one is overridden)."""
        attempt = await lock.acquire_or_read(ignore_value=ignore_value)
        if attempt.outcome is Outcome.VALUE:
            entry = self._decode(attempt.value)
            if entry is not None:
                return attempt, entry
            attempt = await lock.acquire_or_read(ignore_value=True)
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
                attempt, entry = await self._acquire(lock, ignore_value=False)
                if entry is not None:
                    return attempt, entry
                if attempt.outcome is Outcome.ACQUIRED:
                    if not notified:
                        self._counters.takeovers += 1
                    return attempt, None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return attempt, None
                notified = await signal.wait_notified(
                    min(remaining, attempt.lease_left + LEASE_SLACK)
                )

    async def _load_as_holder(
        self, lock: RebuildLock, loader: Callable[[], Awaitable[T]], policy: Policy
    ) -> T:
        self._counters.lock_acquired += 1
        started = time.monotonic()
        try:
            async with lock.kept_alive():
                value = await self._call_loader(loader, policy)
        except BaseException:
            # Wake the waiters now (they retry) rather than after the lease runs out.
            with contextlib.suppress(BackendError):
                await asyncio.shield(lock.release())
            raise
        ttl = self._ttl_for(value, policy)
        try:
            if ttl is None:
                await lock.release()
            else:
                data = self._encode(value, policy, ttl=ttl, compute_time=time.monotonic() - started)
                if not await lock.fill(data, ttl):
                    self._counters.lock_lost += 1
        except BackendError:
            pass  # counted; the value is still served to this process's callers
        return value

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _ttl_for(value: Any, policy: Policy) -> float | None:
        """How long ``value`` is cached under ``policy``; None: not at all."""
        return policy.negative_ttl if value is None else policy.ttl

    def _encode(self, value: Any, policy: Policy, *, ttl: float, compute_time: float) -> bytes:
        """The record bytes of ``value`` (``None`` gives a negative record)."""
        negative = value is None
        now = time.time()
        soft_ttl = None if negative else policy.soft_ttl
        return Record(
            payload=b"" if negative else self.serializer.dumps(value),
            negative=negative,
            serializer_tag=self.serializer.tag,
            stored_at=now,
            expires_at=now + ttl,
            soft_expires_at=None if soft_ttl is None else now + soft_ttl,
            compute_time=compute_time,
        ).encode()

    async def _store(self, rkey: bytes, data: bytes, ttl: float) -> None:
        await self._backend.eval(
            STORE_AND_RELEASE,
            (rkey, self.keys.lock(rkey)),
            (data, max(1, round(ttl * 1000)), self.keys.channel(rkey)),
        )

    def _detach(self, rkey: bytes) -> None:
        """After a write, later callers must not join a flight that began before it."""
        self._reads.forget(rkey)
        self._loads.forget(rkey)
