"""
`Cache`: the facade users hold. `Cache.get_or_load` composes the guards in one fixed order.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Self, TypeVar, cast

from ._types import Key, Serializer
from .backend import RedisBackend, RedisClient
from .errors import BackendError, CacheClosedError, ConfigurationError
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


class _Entry:
    """A record read from Redis, with its payload decoded once for every caller."""

    __slots__ = ("record", "value")

    def __init__(self, record: Record, value: Any) -> None:
        self.record = record
        self.value = value


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
        return self._counters.snapshot()

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
        if entry is None:
            return default
        return None if entry.record.negative else entry.value

    async def set(self, key: Key, value: Any, *, ttl: float | None = None) -> None:
        """
        Store ``value`` under ``key`` for ``ttl`` seconds (default: the Cache policy's ttl).

        ``None`` is stored as a negative result. Callers that start after this returns read
        the new value, never an older read that was still in flight.

        Raises:
            ConfigurationError: ``ttl`` is out of range.
            SerializationError: the serializer cannot encode ``value``.
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        policy = self.policy if ttl is None else Policy(ttl=ttl, negative_ttl=ttl)
        ttl = self._ttl_for(value, policy) or policy.ttl  # an explicit None is always stored
        await self._write(rkey, self._encode(value, policy, ttl=ttl, compute_time=0.0), ttl)
        self._detach(rkey)

    async def delete(self, key: Key) -> bool:
        """
        Remove ``key``; returns whether it was cached.

        Raises:
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        try:
            removed = await self._backend.delete(rkey)
        except BackendError:
            self._counters.redis_errors += 1
            raise
        self._detach(rkey)
        return removed > 0

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
            entry = None  # carry on without Redis: the loader is still single-flighted
        if entry is not None:
            return cast(T, None if entry.record.negative else entry.value)
        return await self._fill(rkey, loader, policy)

    async def _read(self, rkey: bytes) -> _Entry | None:
        counters = self._counters
        try:
            data = await self._backend.get(rkey)
        except BackendError:
            counters.redis_errors += 1
            raise
        if data is None:
            counters.misses += 1
            return None
        try:
            record = Record.decode(data)
            if record.serializer_tag != self.serializer.tag:
                raise RecordError(f"written with serializer tag {record.serializer_tag}")
            value = None if record.negative else self.serializer.loads(record.payload)
        except Exception:
            # Foreign, corrupt or differently serialized bytes: a miss that the fill overwrites.
            counters.decode_errors += 1
            counters.misses += 1
            return None
        if record.negative:
            counters.negative_hits += 1
        else:
            counters.hits += 1
        return _Entry(record, value)

    async def _fill(self, rkey: bytes, loader: Callable[[], Awaitable[T]], policy: Policy) -> T:
        counters = self._counters
        counters.loader_calls += 1
        started = time.monotonic()
        try:
            value = await loader()
        except Exception:
            counters.loader_errors += 1
            raise
        ttl = self._ttl_for(value, policy)
        if ttl is not None:
            data = self._encode(value, policy, ttl=ttl, compute_time=time.monotonic() - started)
            with contextlib.suppress(BackendError):  # counted; the value is still served
                await self._write(rkey, data, ttl)
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

    async def _write(self, rkey: bytes, data: bytes, ttl: float) -> None:
        try:
            await self._backend.set(rkey, data, ttl=ttl)
        except BackendError:
            self._counters.redis_errors += 1
            raise

    def _detach(self, rkey: bytes) -> None:
        """After a write, later callers must not join a flight that began before it."""
        self._reads.forget(rkey)
        self._loads.forget(rkey)
