"""`Cache`: the facade users hold. `Cache.get_or_load` reads as DESIGN.md's steps."""

from __future__ import annotations

import asyncio
import random
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Self, TypeVar, cast

from . import permissions
from ._checks import check_instance, check_seconds, check_serializer
from ._types import Key, Serializer
from .backend import RedisBackend, RedisClient, client_from_url
from .bulk import BulkOperations
from .codec import DEFAULT_MAX_VALUE_BYTES, Entry, RecordCodec
from .errors import (
    AuthenticationError,
    BackendError,
    CacheClosedError,
    ConfigurationError,
    InsecurePickleWarning,
)
from .guards.bloom import BloomFilter
from .guards.breaker import Breaker
from .guards.local import LocalCache
from .guards.lock import unlink
from .guards.notify import FillNotifier
from .guards.singleflight import SingleFlight
from .keys import KeySpace
from .loading import LoaderRunner
from .metrics import Counters, Emitter, Hook, Statistics
from .near import NearCache
from .policy import Policy
from .reading import Reader
from .rebuild import Rebuilder
from .record import Signer
from .refreshing import Refreshes
from .serializers import MsgspecJsonSerializer, PickleSerializer

__all__ = ("Cache",)

T = TypeVar("T")

#: The default budget of one Redis command, in seconds. redis-py's own defaults wait about a
#: minute on a blackholed server; a cache that is slower than its database is worse than none.
DEFAULT_COMMAND_TIMEOUT: Final = 1.0


_Loader = Callable[[], Awaitable[Any]]
_UNREACHABLE: Final[Any] = object()  # the read failed: Redis is unreachable (or too slow)
_UNREAD: Final[Any] = object()  # a flight started before anything was read: it reads first


class Cache(BulkOperations):
    """
    A namespaced cache on a ``redis.asyncio`` client that guards the loader behind it.

    Args:
        client: A ready ``redis.asyncio.Redis`` (or ``RedisCluster``, or a Sentinel
            ``master_for`` client) created with ``decode_responses=False``; yours to close.
        namespace: Prefix of every key, so caches of different data never collide.
        policy: The default `Policy` of every entry; `get_or_load` can override it per call.
        serializer: How values become bytes. Default `MsgspecJsonSerializer`; pickle if asked.
        command_timeout: Seconds one Redis command may take, queueing included, before it
            fails with `BackendTimeout`. Default 1 second.
        max_in_flight: Redis commands outstanding at once (see `RedisBackend`).
        max_refreshes: Background refreshes running at once; more are dropped until the next
            read asks again. Default 32.
        hook: Called with each `Event` (loads, stale served, refreshes, takeovers), for metrics.
        clock: Wall-clock time in seconds, for expiry decisions. Every process sharing the
            Redis must agree on it; inject a fake one in tests.
        rng: Source of randomness for jitter and XFetch (seed it for reproducible runs).
        bloom: A `BloomFilter` guarding every miss of this Cache. The Cache binds it to its
            client and namespace, and adds the key of every value it writes.
        breaker: The `Breaker` in front of Redis (on by default; None switches it off): once
            Redis is found unreachable, calls skip it without spending a budget.
        replica: A replica's client (e.g. Sentinel ``slave_for``), read when the primary fails.
        max_concurrent_loads: At most this many top-level loads at once here (a bulkhead);
            the loads a loader causes run under its slot (`aiocacheguard.loading`).
        local: An L1 in this process (`LocalCache`): hits without I/O, invalidated by Redis
            (CLIENT TRACKING) when any client changes a key; see `aiocacheguard.near`.
        max_value_bytes: Largest record cached, default 16 MiB (see `ValueTooLargeError`).
        signing_key: Sign every record written (HMAC-SHA256, bound to its Redis key) and
            serve only records signed with this key or a ``verify_keys`` one: any other is a
            miss, counted in ``forged_records``, its payload never decoded. At least 32 bytes
            (``secrets.token_bytes(32)``), the same in every process of the namespace.
            Needed with `PickleSerializer` wherever others can write to Redis.
        verify_keys: Keys whose records are accepted but never written, for a rotation:
            ``signing_key=new, verify_keys=(old,)`` (docs/security.md gives the steps).

    Raises:
        ConfigurationError: an argument is out of range; the message says what is accepted
            (never a key's bytes).

    Warns:
        InsecurePickleWarning: `PickleSerializer` without ``signing_key``: a record anyone
            wrote to Redis runs code here when read.

    Example:
        >>> import asyncio, redis.asyncio as redis
        >>> from aiocacheguard import Cache, LocalCache, Policy
        >>> from aiocacheguard.testing import RedisServer
        >>> async def main(port: int) -> object:
        ...     client = redis.Redis(port=port)
        ...     policy, l1 = Policy(ttl=30.0), LocalCache(ttl=5.0)  # l1: optional, no-I/O hits
        ...     async with Cache(client, namespace="doc", policy=policy, local=l1) as cache:
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
        breaker: Breaker | None = Breaker(),  # noqa: B008 - frozen, so one shared default is safe
        replica: RedisClient | None = None,
        max_concurrent_loads: int | None = None,
        local: LocalCache | None = None,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        signing_key: bytes | None = None,
        verify_keys: Sequence[bytes] = (),
    ) -> None:
        check_instance("policy", policy, Policy)
        serializer = MsgspecJsonSerializer() if serializer is None else serializer
        check_serializer(serializer)
        signer = _signer(signing_key, verify_keys, serializer)
        check_seconds("command_timeout", command_timeout, maximum=60.0)
        check_instance("bloom", bloom, BloomFilter, optional=True)
        self.keys = KeySpace(namespace)
        self.policy, self.serializer, self.bloom = policy, serializer, bloom
        self._emit = emit = Emitter(hook)
        budget, moved = float(command_timeout), emit.breaker_moved
        self._codec = RecordCodec(serializer, max_value_bytes, clock=clock, rng=rng, signer=signer)
        limit = self._codec.max_value_bytes  # (checked) reads refuse larger values in Redis
        self._backend = RedisBackend.of(
            client, budget, max_in_flight, breaker, moved, max_value_bytes=limit
        )
        self.breaker = self._backend.breaker
        self._replica = None
        if replica is not None:
            self._replica = RedisBackend.of(replica, budget, None, breaker, max_value_bytes=limit)
        self._counters = counters = Counters()
        self._near = near = NearCache.of(local, client, self.keys.prefix, clock, budget)
        self._local = None if near is None else near.store
        self._reads = Reader(self._backend, self._codec, counters, replica=self._replica, near=near)
        self._loads: SingleFlight[bytes, Any] = SingleFlight(name="load")
        self._load = LoaderRunner(counters, emit, max_concurrent=max_concurrent_loads)
        self._notifier = FillNotifier()
        self._notifier.bind(self._backend.subscriber(self._notifier.deliver))
        self._rebuilder = Rebuilder(self._backend, self._notifier, self._codec, self._load)
        if bloom is not None:
            bloom.bind(self._backend, namespace=self.keys.namespace)
        self._on_fill = on_fill = None if bloom is None else bloom.filled
        self._refreshes = Refreshes(self._rebuilder, clock, max_refreshes, self._detach, on_fill)
        self._closing: asyncio.Task[None] | None = None
        self._owns_client = False  # from_url: the Cache made the client, and closes it

    @classmethod
    def from_url(cls, url: str, *, namespace: str, policy: Policy, **options: Any) -> Cache:
        """
        A Cache on a client made from ``url`` (``redis://``, ``rediss://``, ``unix://``) with
        redis-py's retries off (one command, one budget), closed by `aclose`; ``options`` as
        in `Cache`.

        Example:
            >>> Cache.from_url("redis://localhost/0", namespace="shop", policy=Policy(ttl=30.0))
            <Cache namespace='shop' Policy(ttl=30.0, ...) open>
        """
        cache = cls(client_from_url(url), namespace=namespace, policy=policy, **options)
        cache._owns_client = True
        return cache

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<Cache namespace={self.namespace!r} {self.policy!r} {state}>"

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    async def __aenter__(self) -> Self:
        self._check_open()
        if self._near is not None:  # the L1 serves once it hears invalidations: start now
            await self._near.wait_serving(self._backend.command_timeout)
        # Awaited, like the L1's start: its few commands are done before the Cache is used
        # (bounded by one command budget, as the L1's wait is, where Redis is down).
        await self._check_permissions()
        return self

    async def _check_permissions(self) -> None:
        """
        Ask Redis (ACL DRYRUN, one probe then one pipelined round trip) whether this Cache's
        user may do what the Cache needs, and say in one warning what it lacks. Silent where
        Redis cannot be asked (Redis < 7, a user not allowed ACL DRYRUN, Redis down, within
        one command budget): the first refusal says it then.
        """
        local, bloom = self._near is not None, self.bloom is not None
        try:
            found = await permissions.check(
                self._backend.client,
                self.namespace,
                local=local,
                bloom=bloom,
                budget=self._backend.command_timeout,
            )
        except AuthenticationError as exc:
            self._backend.note(exc)
            return
        lacking = list(dict.fromkeys(rule for rules in (found or {}).values() for rule in rules))
        if lacking:
            flags = " --local" * local + " --bloom" * bloom
            self._backend.denied(
                f"the Redis user {permissions.user_of(self._backend.client)!r} lacks what a "
                f"Cache of namespace {self.namespace!r} needs (ACL DRYRUN): "
                f"{' '.join(lacking)}; `aiocacheguard acl --namespace {self.namespace}{flags}` "
                "prints the ACL SETUSER line that grants it",
                count=len(lacking),
            )

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, *, drain: bool = False) -> None:
        """
        Stop all work and wait for it; idempotent. Flights are cancelled (their callers get
        `CacheClosedError`) and their locks released; refreshes too, or with ``drain=True``
        awaited. No task outlives this call; a client you gave stays open (`from_url`'s closes).
        """
        if self._closing is None:
            self._closing = asyncio.create_task(self._aclose(drain), name="aiocacheguard-close")
        await asyncio.shield(self._closing)

    async def _aclose(self, drain: bool) -> None:
        await self._refreshes.aclose(drain=drain)
        # Flights, the lock releases they left, subscriptions, the L1's listeners, connections.
        for part in (self._loads, self._rebuilder, self._notifier, self._near, self._backend):
            if part is not None:
                await part.aclose()
        if self._replica is not None:
            await self._replica.aclose()
        if self._owns_client:
            await self._backend.client.aclose()

    def _check_open(self) -> None:
        if self._closing is not None:
            raise CacheClosedError("this Cache was closed with aclose(); create a new one")

    def statistics(self) -> Statistics:
        """A frozen snapshot of the counters (see `Statistics`)."""
        return self._counters.snapshot(
            **self._codec.counters(),
            notify_fallbacks=self._notifier.fallbacks,
            **self._backend.counters(),
            **(self.bloom.counters() if self.bloom else {}),
            **(self._near.counters() if self._near else {}),
            **self._load.statistics(),
        )

    async def get(self, key: Key, default: Any = None, *, returns: object = None) -> Any:
        """
        The cached value of ``key``, or ``default`` when nothing usable is cached.

        A cached negative result (a loader's ``None``) returns ``None``, not ``default``; a value
        past its soft TTL is returned, one past its TTL is not. ``returns`` as in `get_or_load`.

        Raises:
            InvalidKeyError: the key is empty, too long or not str/bytes.
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        entry = await self._reads.read(rkey, self.policy.local_ttl, coalesced=True)
        if entry is None or not entry.fresh(self._codec.clock()):
            return default
        return entry.result_or(default, returns)

    async def set(self, key: Key, value: Any, *, ttl: float | None = None) -> None:
        """
        Store ``value`` under ``key`` with the Cache's policy; ``ttl`` replaces its TTL (no
        jitter then, a soft TTL kept at the same fraction). ``None`` is stored as a negative
        result. Later callers read this value; a rebuild in progress anywhere is superseded.

        Raises:
            ConfigurationError: ``ttl`` is out of range.
            SerializationError: ``value`` cannot be encoded, or is too large (`ValueTooLargeError`).
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        await self._prepared_set(key, value, ttl)()

    def _prepared_set(
        self, key: Key, value: Any, ttl: float | None, *, jitter: bool = False
    ) -> Callable[[], Awaitable[None]]:
        """`set` in two steps: all that can fail before I/O now, the write when called
        (``jitter``: spread an explicit ``ttl`` as the policy spreads its own)."""
        rkey = self.keys.value(key)
        stored = self._rebuilder.encode(
            rkey, value, self.policy.for_write(ttl=ttl, negative=value is None, jitter=jitter)
        )

        async def write() -> None:
            try:
                await self._rebuilder.store(rkey, value, stored, on_fill=self._on_fill)
            finally:
                self._detach(rkey)

        return write

    async def delete(self, key: Key) -> bool:
        """
        Remove ``key``; returns whether it was cached. A rebuild of it in progress anywhere
        loses its lock, so a value loaded from data older than this is never written.

        Raises:
            BackendError: Redis failed or did not answer within ``command_timeout``.
        """
        self._check_open()
        rkey = self.keys.value(key)
        removed = await unlink(self._backend, rkey)
        self._detach(rkey)
        return removed

    async def get_or_load(
        self,
        key: Key,
        loader: Callable[[], Awaitable[T]],
        *,
        policy: Policy | None = None,
        returns: object = None,
    ) -> T:
        """
        The cached value of ``key``; on a miss, ``await loader()`` once and cache its result.

        A fresh L1 entry returns at once. Concurrent calls for one key in this process share
        one Redis read and one flight (1,000 calls: one GET, at most one loader call); a
        cancelled caller leaves it to the others; when all are cancelled, so is the loader.
        On a miss, with ``policy.lock``, one process of the deployment loads while the others
        wait for its fill (`aiocacheguard.rebuild`; a dead holder is taken over within
        ``lock_ttl``). Past ``soft_ttl`` (or earlier, by XFetch) the value is returned and one
        background refresh started. A loader's ``None`` is cached for ``negative_ttl``. With
        Redis unreachable: the L1's entry within ``stale_if_error``, else the loader, still
        once per key here. docs/policy.md says what each field does.

        Args:
            key: str or bytes, at most `aiocacheguard.keys.MAX_KEY_BYTES` bytes.
            loader: An async function of no arguments, e.g. a database query.
            policy: Overrides the Cache's policy for this call (the flight's first caller's
                policy, and ``returns``, are the ones that count).
            returns: The type a hit is decoded into (``tuple[int, str]``, a dataclass, ...),
                so a hit returns what the miss returned; a stored value that does not decode
                into it is a counted miss, reloaded. ``@cached`` passes the function's.

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
        policy = self.policy.for_call(policy, loader)
        # The L1: a fresh local entry returns at once, no I/O, no task (XFetch still draws).
        local, local_ttl = self._local, policy.local_ttl  # local_ttl 0: never from the L1
        if (
            local is not None
            and local_ttl != 0
            and (held := local.get(rkey, None, local_ttl)) is not None
            and held.usable(returns)
        ):
            self._refreshes.maybe_start(rkey, held, loader, policy, self._codec.clock())
            return cast(T, held.result(returns))
        # Join this process's flight for the key if one is loading it or a read is on its way
        # (the flight shares that read), so thousands of callers are woken once, not twice.
        # Else read the record in this caller's task (a hit creates no task); serve it if fresh.
        entry: Any = _UNREAD
        flight = self._loads.flight(rkey)
        if flight is not None or rkey in self._reads:
            self._counters.coalesced += 1
        else:
            served, entry = await self._read_for(rkey, loader, policy, returns)
            if served:
                return cast(T, entry)
        # Missing, expired or unreachable: one flight per key loads it (see `_flight`). This is
        # SingleFlight.run written out: in a stampede every caller holds what it waits with
        # until the outcome lands, and a future is all it needs, not a coroutine of its own.
        lent = None
        if flight is None:  # (a flight found above is still the key's: no await since)
            flight = self._loads.join(rkey, self._flight, rkey, loader, policy, returns, entry)
        else:  # a caller inside a loader lends the flight its bulkhead slot (loading.py)
            lent = self._load.lend(rkey)
        waiter = flight.waiter()
        try:
            return cast(T, await waiter)
        except BaseException:
            flight.leave(waiter)  # cancelled: the last caller out cancels the flight
            raise
        finally:
            if lent is not None:
                lent()

    async def refresh(
        self,
        key: Key,
        loader: Callable[[], Awaitable[T]],
        *,
        policy: Policy | None = None,
        returns: object = None,
    ) -> T:
        """
        Load ``key`` again now, whatever is cached, write it, and return the new value. Joins a
        refresh of the key running here; if another process holds the rebuild lock, waits for
        its fill and returns it. A value it could not write is not returned: like `set`, it
        raises, so a caller never holds a value that later reads do not see.

        Raises:
            BackendError: Redis failed or did not answer within ``command_timeout`` (or the
                circuit breaker is open): nothing was written, reads keep the old value.
            LockTimeout: another process's refresh held the key's rebuild lock for
                ``policy.wait_timeout`` without filling it.
            ValueTooLargeError: the value is past ``max_value_bytes`` (not written).
            Exception: what `get_or_load` raises otherwise (the loader's own errors).
        """
        self._check_open()
        rkey = self.keys.value(key)
        policy = self.policy.for_call(policy, loader)
        return cast(T, await self._refreshes.run(rkey, loader, policy, returns))

    async def _read_for(
        self, rkey: bytes, loader: _Loader, policy: Policy, returns: object
    ) -> tuple[bool, Any]:
        """``(True, result)`` of a fresh entry (refreshed where due), else ``(False, entry)``."""
        if returns is not None:
            self._codec.decoder(returns)  # a type the serializer cannot decode into: say so now
        try:
            entry = await self._reads.read(rkey, policy.local_ttl)
        except BackendError:
            return False, _UNREACHABLE
        now = self._codec.clock()
        if entry is None or not entry.fresh(now) or not entry.usable(returns):
            return False, entry  # an unusable one is replaced like an expired one
        self._refreshes.maybe_start(rkey, entry, loader, policy, now)
        return True, entry.result(returns)

    async def _flight(
        self, rkey: bytes, loader: _Loader, policy: Policy, returns: object, entry: Any = _UNREAD
    ) -> Any:
        """One flight per key: the steps after a read that found nothing fresh."""
        if entry is _UNREAD:  # started by joiners while a read was on its way: share it
            served, entry = await self._read_for(rkey, loader, policy, returns)
            if served:
                return entry
        # Redis unreachable (or its breaker open): the L1's entry within stale_if_error, else
        # load without Redis, still one load per key here.
        if entry is _UNREACHABLE:
            if held := self._reads.local(rkey, self._codec.clock(), policy, returns):
                return self._stale(rkey, held, returns, None)
            self._counters.unwritten_loads += 1
            return await self._load(rkey, loader, policy)
        # A miss the Bloom filter rules out: the key exists nowhere.
        bloom = self.bloom
        if entry is None and bloom and not await bloom.may_contain(self.keys.user_key(rkey)):
            return None
        # Rebuild across processes: take the lock and load, or wait for the fill.
        try:
            return await self._rebuilder.load(
                rkey, loader, policy, expired=entry, on_fill=self._on_fill, returns=returns
            )
        except Exception as exc:
            # Stale-if-error: the previous value, within the policy's grace.
            if entry is None or not entry.stale_if_error(self._codec.clock(), policy, returns):
                raise
            return self._stale(rkey, entry, returns, exc)

    def _stale(self, rkey: bytes, entry: Entry, returns: object, exc: BaseException | None) -> Any:
        self._counters.stale_served += 1
        self._emit("stale_served", rkey, exc)
        return entry.result(returns)

    def _detach(self, rkey: bytes) -> None:
        """After a write, later callers must not join a read or flight that began before it."""
        self._reads.forget(rkey)
        self._loads.forget(rkey)
        self._refreshes.forget(rkey)


def _signer(
    signing_key: bytes | None, verify_keys: Sequence[bytes], serializer: Serializer
) -> Signer | None:
    """The Cache's record signer (None: unsigned), its keys checked before any I/O."""
    if signing_key is None:
        if verify_keys:
            raise ConfigurationError(
                "verify_keys",
                f"<{len(verify_keys)} key(s)>",
                "keys beside a signing_key (a Cache without one checks no signature)",
            )
        if isinstance(serializer, PickleSerializer):
            warnings.warn(
                "PickleSerializer without signing_key: whoever can write to this Redis can "
                "run code in this process through any record it reads; pass "
                "signing_key=<32+ secret bytes> (see docs/security.md)",
                InsecurePickleWarning,
                stacklevel=3,
            )
        return None
    return Signer(signing_key, verify_keys)
