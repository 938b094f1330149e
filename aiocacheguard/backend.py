"""
The only module that talks to Redis: command budgets, error mapping, and batching of commands.

Every command runs under a budget of ``command_timeout`` seconds, because redis-py's defaults
wait about a minute on a blackholed server. Every ``redis`` and ``OSError`` error is translated
here, in `to_backend_error`, into the library's `BackendError` tree.

Batching costs nothing when there is nothing to batch: a command asked for while no other is
outstanding goes straight to Redis in the caller's task. Commands asked for while others are
outstanding are coalesced (DataLoader style): those of one event-loop turn leave together, GETs
as MGETs and scripts as pipelines, in chunks of `MAX_BATCH` sent side by side (`MAX_BATCHES`
of a kind, and ``max_in_flight`` commands in all, at once), so a default
``redis.asyncio.Redis()`` (whose pool raises ``MaxConnectionsError`` past 100 connections in
redis-py 8) survives any number of callers. A batch waiting for its turn fails at once when
one ahead of it could not reach Redis, rather than spend a budget already known to be lost.

A batch of reads that runs out of its budget (one huge value in it, say) is not failed as a
whole: each read is retried alone with a budget of its own, so one slow value fails alone (a
read in such a batch may take up to two budgets). Timeouts tell the circuit breaker, which
ends an outage's waiting once it opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, Literal, Self, TypeVar, cast

import redis.asyncio as redis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._checks import check_instance, check_int
from ._types import LuaScript, ScriptArg, Subscriber
from .errors import BackendError, BackendTimeout, BackendUnavailable, ConfigurationError
from .guards.breaker import Breaker, BreakerState, CircuitBreaker

__all__ = (
    "FOREIGN",
    "INVALIDATION_CHANNEL",
    "RedisBackend",
    "RedisClient",
    "TrackingConnection",
    "budgeted",
    "client_from_url",
    "to_backend_error",
)

T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger("aiocacheguard")

#: One script call: the script, its keys and its arguments.
_ScriptCall = tuple[LuaScript, tuple[bytes, ...], tuple[ScriptArg, ...]]

#: What the Cache accepts: a standalone (or Sentinel ``master_for``) client, or a cluster client.
RedisClient = redis.Redis | RedisCluster

#: Keys per MGET or pipeline. Large enough to amortise a round trip, small enough that one
#: reply is parsed without stalling the event loop for long.
MAX_BATCH = 256
#: Batches of one kind (reads or scripts) outstanding at once. More would not be answered
#: sooner (one event loop parses every reply) but would each take longer, out of budget.
MAX_BATCHES = 4

#: What `RedisBackend.get` returns for a key holding another Redis type (a hash, a list): bytes
#: no record starts with, so the Cache counts them as foreign and the next fill replaces them.
FOREIGN: Final = b""

#: What redis-py and sockets raise. redis-py's cluster errors (a slot no node covers, say) do
#: not derive from RedisError.
_REDIS_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)

#: Refused writes less than this many seconds apart are one episode: one warning.
REFUSAL_EPISODE: Final = 60.0


def to_backend_error(exc: BaseException) -> BackendError:
    """The `BackendError` that stands for a redis-py or socket error."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, redis_errors.TimeoutError | TimeoutError):
        error: BackendError = BackendTimeout(
            f"Redis did not answer in time: {str(exc) or 'the command budget was spent'}"
        )
    elif isinstance(exc, redis_errors.ConnectionError | OSError):
        error = BackendUnavailable(f"Redis is unreachable: {exc}")
    else:
        error = BackendError(f"Redis error: {exc}")
    error.__cause__ = exc
    return error


async def budgeted(command: Awaitable[T], budget: float) -> T:
    """
    One command outside the Cache's batching (operations, bulk scans) under ``budget``
    seconds, its errors translated like every other command's.
    """
    try:
        async with asyncio.timeout(budget):
            return await command
    except (*_REDIS_ERRORS, TimeoutError) as exc:
        raise to_backend_error(exc) from exc


def _is_wrongtype(exc: BaseException) -> bool:
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("WRONGTYPE")


class _Queued(Generic[ItemT, ResultT]):
    __slots__ = ("future", "item")

    def __init__(self, item: ItemT, future: asyncio.Future[ResultT]) -> None:
        self.item = item
        self.future = future


class _Batcher(Generic[ItemT, ResultT]):
    """
    Coalesces the requests of one event-loop turn into batches sent side by side, at most
    `MAX_BATCHES` of one kind at a time (and within ``max_in_flight``).

    A batch has one budget from the moment it is sent. A batch waiting for its turn when a
    batch ahead of it fails (Redis unreachable, or out of time) fails at once with the same
    error instead of spending a budget of its own already known to be lost. A caller cancelled
    while queued is dropped from its batch; one cancelled after its batch left stops waiting.
    """

    def __init__(
        self,
        backend: RedisBackend,
        flush: Callable[[list[ItemT]], Awaitable[Sequence[ResultT | BaseException]]],
        *,
        name: str,
        split_on_timeout: bool,
    ) -> None:
        self._backend = backend
        self._flush = flush
        self._name = name
        self._split = split_on_timeout
        self._queue: list[_Queued[ItemT, ResultT]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._lanes = asyncio.Semaphore(MAX_BATCHES)
        self._epoch = 0  # batches failed so far; a batch sent in an older epoch fails fast
        self._failure: BackendError | None = None

    async def submit(self, item: ItemT) -> ResultT:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._queue.append(_Queued(item, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        self._scheduled = False
        live = [q for q in self._queue if not q.future.done()]
        self._queue.clear()
        for start in range(0, len(live), MAX_BATCH):
            self._send(live[start : start + MAX_BATCH])

    def _send(self, batch: list[_Queued[ItemT, ResultT]], deadline: float | None = None) -> None:
        task = asyncio.create_task(
            self._run(batch, self._epoch, deadline), name=f"aiocacheguard-{self._name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[_Queued[ItemT, ResultT]], epoch: int, deadline: float | None
    ) -> None:
        async with self._lanes, self._backend.slots:
            if self._epoch > epoch and self._failure is not None:
                self._fail(batch, self._failure, count=False)
                return
            refused = self._backend.refused()
            if refused is not None:  # the circuit breaker is open: no I/O, no budget spent
                self._fail(batch, refused, count=False)
                return
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self._backend.command_timeout
            results = await self._flush_within(batch, deadline)
        if results is None:
            return
        self._backend.record(None)
        for queued, result in zip(batch, results, strict=True):
            if queued.future.done():
                continue
            if isinstance(result, BaseException):
                queued.future.set_exception(to_backend_error(result))
            else:
                queued.future.set_result(result)

    async def _flush_within(
        self, batch: list[_Queued[ItemT, ResultT]], deadline: float
    ) -> Sequence[ResultT | BaseException] | None:
        batch[:] = [q for q in batch if not q.future.done()]  # gone while waiting for a turn
        if not batch:
            return None
        try:
            async with asyncio.timeout_at(deadline):
                return await self._flush([q.item for q in batch])
        except TimeoutError:
            if self._split and len(batch) > 1:
                # One slow value (a huge one) must not fail the reads batched with it: each
                # is read again alone, with a budget of its own. A Redis that is down fails
                # those too, and the breaker, told of this timeout, soon opens.
                self._backend.errors += 1
                self._backend.record(BackendTimeout("batch"))
                for queued in batch:
                    self._send([queued])
                return None
            self._fail(batch, BackendTimeout("Redis did not answer in time"))
        except _REDIS_ERRORS as exc:
            self._fail(batch, to_backend_error(exc))
        except BaseException:
            for queued in batch:
                queued.future.cancel()
            raise
        return None

    def _fail(
        self, batch: list[_Queued[ItemT, ResultT]], error: BackendError, *, count: bool = True
    ) -> None:
        if count:
            self._backend.errors += 1
            self._backend.record(error)
            if isinstance(error, BackendUnavailable):  # Redis is unreachable: the queue too
                self._epoch += 1
                self._failure = error
        for queued in batch:
            if not queued.future.done():
                queued.future.set_exception(error)

    async def aclose(self) -> None:
        for queued in self._queue:
            queued.future.cancel()
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def client_from_url(url: str) -> redis.Redis:
    """
    A client for ``url`` with redis-py's own retries off, so that one command spends one
    budget (see `RedisBackend`).

    Raises:
        ConfigurationError: the URL is not one redis-py understands.
    """
    try:
        return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    except ValueError as exc:
        raise ConfigurationError(
            "url", url, f"a redis://, rediss:// or unix:// URL ({exc})"
        ) from None


def _pool_limit(client: RedisClient) -> int | None:
    pool = getattr(client, "connection_pool", None)
    limit = getattr(pool, "max_connections", None)
    return limit if isinstance(limit, int) and limit > 0 else None


class RedisBackend:
    """
    Redis commands with budgets, bounded concurrency and batching.

    Args:
        client: A ready ``redis.asyncio`` client with ``decode_responses=False``.
        command_timeout: Seconds one command may take, from being asked for to its answer.
        max_in_flight: Commands (or batches) outstanding at once. Default: half the client's
            pool size, at most 50, so other users of the same client keep connections too.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        command_timeout: float,
        max_in_flight: int | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if not isinstance(client, redis.Redis | RedisCluster):
            raise ConfigurationError(
                "client", client, "a redis.asyncio.Redis or redis.asyncio.RedisCluster instance"
            )
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses") or getattr(
            getattr(client, "encoder", None), "decode_responses", False
        ):
            raise ConfigurationError(
                "client",
                client,
                "a client created with decode_responses=False (records are binary)",
            )
        if max_in_flight is None:
            limit = _pool_limit(client)
            max_in_flight = max(1, min(50, limit // 2 if limit else 50))
        else:
            check_int("max_in_flight", max_in_flight, minimum=1)
        self.client = client
        self.breaker = breaker
        self.command_timeout = command_timeout
        self.max_in_flight = max_in_flight
        self.slots = asyncio.Semaphore(max_in_flight)
        self._cluster_slots = asyncio.Semaphore(max_in_flight)
        self._outstanding = 0
        self._reads: _Batcher[bytes, bytes | None] = _Batcher(
            self, self._mget, name="mget", split_on_timeout=True
        )
        self._scripts: _Batcher[_ScriptCall, Any] = _Batcher(
            self, self._eval_batch, name="eval", split_on_timeout=False
        )
        self._pubsub: _PubSub | None = None
        #: Commands that failed or ran out of time, for `Statistics.redis_errors`.
        self.errors = 0
        #: Writes Redis refused (OOM under noeviction, READONLY): `Statistics.writes_refused`.
        self.writes_refused = 0
        self._last_refusal = -REFUSAL_EPISODE  # monotonic time of the last refused write

    @classmethod
    def of(
        cls,
        client: RedisClient,
        command_timeout: float,
        max_in_flight: int | None,
        breaker: Breaker | None,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> RedisBackend:
        """A backend with a circuit breaker of its own (a replica's failures say nothing of
        its primary's, so each client gets one)."""
        check_instance("breaker", breaker, Breaker, optional=True)
        circuit = None
        if breaker is not None:
            circuit = CircuitBreaker(breaker, on_transition=on_transition)
        return cls(
            client, command_timeout=command_timeout, max_in_flight=max_in_flight, breaker=circuit
        )

    def counters(self) -> dict[str, int]:
        """This backend's share of a Cache's statistics."""
        breaker = self.breaker
        return {
            "redis_errors": self.errors,
            "writes_refused": self.writes_refused,
            "breaker_opened": breaker.opened if breaker else 0,
            "short_circuited": breaker.short_circuited if breaker else 0,
        }

    def refused(self) -> BackendUnavailable | None:
        """The error to fail with at once while the circuit breaker refuses calls, else None."""
        breaker = self.breaker
        if breaker is None or breaker.allow():
            return None
        return BackendUnavailable(
            "Redis is treated as unreachable: the circuit breaker is open after repeated "
            f"failures; it lets a call through again {breaker.config.open_for:g}s after opening"
        )

    def record(self, error: BackendError | None) -> None:
        """Tell the breaker how a call it let through ended."""
        if self.breaker is not None:
            self.breaker.record(not isinstance(error, BackendUnavailable | BackendTimeout))

    def _note(self, exc: BaseException) -> None:
        """
        Count writes Redis refused; one warning per episode (a refusal after a quiet minute
        starts a new one), not one per write.
        """
        if not isinstance(exc, redis_errors.OutOfMemoryError | redis_errors.ReadOnlyError):
            return
        self.writes_refused += 1
        now = time.monotonic()
        if now - self._last_refusal >= REFUSAL_EPISODE:
            logger.warning(
                "Redis refuses writes (%s: %s): values are served but not cached until it "
                "accepts them again (%d refused so far)",
                type(exc).__name__,
                exc,
                self.writes_refused,
            )
        self._last_refusal = now

    async def _direct(self, command: Callable[[], Awaitable[T]]) -> T:
        """One command in the caller's task, under its budget (none while the breaker is open)."""
        refused = self.refused()
        if refused is not None:
            raise refused
        async with self.slots:
            try:
                async with asyncio.timeout(self.command_timeout):
                    result = await command()
            except (*_REDIS_ERRORS, TimeoutError) as exc:
                self.errors += 1
                error = to_backend_error(exc)
                self.record(error)
                self._note(exc)
                raise error from exc
        self.record(None)
        return result

    async def get(self, key: bytes) -> bytes | None:
        """
        GET ``key`` (`FOREIGN` for a key of another type): straight to Redis when nothing else
        is outstanding, else batched.
        """
        self._outstanding += 1
        try:
            if self._outstanding == 1:  # nothing to coalesce with
                client = self.client
                try:
                    return cast("bytes | None", await self._direct(lambda: client.get(key)))
                except BackendError as exc:
                    if _is_wrongtype(exc.__cause__ or exc):
                        self.errors -= 1  # foreign data, not a Redis failure
                        return FOREIGN
                    raise
            return await self._reads.submit(key)
        finally:
            self._outstanding -= 1

    async def eval(
        self, script: LuaScript, keys: Sequence[bytes], args: Sequence[ScriptArg]
    ) -> Any:
        """
        Run ``script`` with EVALSHA: straight away when nothing else is outstanding, else
        pipelined with this turn's other scripts.

        A script the server does not know (after SCRIPT FLUSH, a restart or a failover) is
        loaded and the call repeated, transparently.
        """
        call = (script, tuple(keys), tuple(args))
        self._outstanding += 1
        try:
            if self._outstanding == 1:
                return await self._direct(lambda: self._evalsha_loading(call))
            return await self._scripts.submit(call)
        finally:
            self._outstanding -= 1

    async def _evalsha_loading(self, call: _ScriptCall) -> Any:
        script, keys, args = call
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    async def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        client = self.client
        if len(keys) == 1:
            try:
                return [cast("bytes | None", await client.get(keys[0]))]
            except redis_errors.ResponseError as exc:
                if _is_wrongtype(exc):
                    return [FOREIGN]
                raise
        if isinstance(client, RedisCluster):
            values = await client.mget_nonatomic(keys)
        else:
            values = await client.mget(keys)
        return cast("list[bytes | None]", list(values))

    async def _eval_batch(self, calls: list[_ScriptCall]) -> list[Any]:
        results = await self._evalsha(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
        if missing:
            for source in {calls[i][0].source for i in missing}:
                await self.client.script_load(source)
            again = await self._evalsha([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, BaseException):
                self.errors += 1
                self._note(result)
        return results

    async def _evalsha(self, calls: list[_ScriptCall]) -> list[Any]:
        client = self.client
        if isinstance(client, RedisCluster):
            # redis-py's cluster pipelines refuse EVALSHA: send them side by side instead;
            # the cluster client routes each by its keys' slot. Errors come back in place, as
            # from a pipeline.
            cluster = client

            async def one(call: _ScriptCall) -> Any:
                script, keys, args = call
                async with self._cluster_slots:  # the cluster's pools are bounded too
                    try:
                        return await cluster.evalsha(script.sha, len(keys), *keys, *args)
                    except _REDIS_ERRORS as exc:
                        return exc

            return list(await asyncio.gather(*(one(c) for c in calls)))

        async with client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    def subscriber(self, on_message: Callable[[bytes, bytes], None]) -> Subscriber:
        """
        The Cache's one pub/sub connection; ``on_message(channel, data)`` is called for every
        message, and with ``b""`` when a channel is subscribed again after a reconnection
        (messages may have been missed). Created on first use, closed by `aclose`.
        """
        if self._pubsub is None:
            self._pubsub = _PubSub(self, on_message)
        return self._pubsub

    async def aclose(self) -> None:
        """Stop the batchers and the subscriber; queued commands are cancelled."""
        await self._reads.aclose()
        await self._scripts.aclose()
        if self._pubsub is not None:
            await self._pubsub.aclose()


class _PubSub:
    """
    One pub/sub connection shared by every waiter of a Cache, with a reader task.

    Subscribing waits for Redis's confirmation, so a PUBLISH that follows can't be missed.
    redis-py reconnects and resubscribes by itself; messages sent while disconnected are lost,
    which waiters tolerate because each wait is also bounded by the lock's remaining lease.
    """

    def __init__(self, backend: RedisBackend, on_message: Callable[[bytes, bytes], None]) -> None:
        self._backend = backend
        self._on_message = on_message
        self._pubsub = backend.client.pubsub()
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    def prepare(self) -> None:
        """
        Open the connection in the background, once, so that the first waiter pays one round
        trip to subscribe instead of a connection set-up as well (under a stampede every round
        trip of the waiting path is one more for every caller).
        """
        if self._connecting is None and not self._closed:
            self._connecting = asyncio.create_task(
                self._connect(), name="aiocacheguard-pubsub-connect"
            )

    async def _connect(self) -> None:
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._backend.command_timeout):
                await self._pubsub.connect()  # type: ignore[no-untyped-call]

    async def subscribe(self, channel: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise BackendUnavailable("the Cache's pub/sub connection was closed (aclose)")
        breaker = self._backend.breaker
        if breaker is not None and breaker.state is BreakerState.OPEN:  # Redis is down
            raise BackendUnavailable("Redis is treated as unreachable: circuit breaker open")
        confirmed = self._confirmations.get(channel)
        if confirmed is None:
            confirmed = self._confirmations[channel] = loop.create_future()
        try:
            async with asyncio.timeout(self._backend.command_timeout):
                if self._connecting is not None and not self._connecting.done():
                    await asyncio.shield(self._connecting)  # one connection, not two
                await self._pubsub.subscribe(channel)
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.create_task(self._read(), name="aiocacheguard-pubsub")
                await asyncio.shield(confirmed)
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            raise to_backend_error(exc) from exc
        finally:
            # Confirmed, failed or given up: nobody waits for this confirmation any more.
            if self._confirmations.get(channel) is confirmed:
                del self._confirmations[channel]

    async def unsubscribe(self, channel: bytes) -> None:
        try:
            async with asyncio.timeout(self._backend.command_timeout):
                await self._pubsub.unsubscribe(channel)
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            raise to_backend_error(exc) from exc

    async def _read(self) -> None:
        failures = 0
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
                failures = 0
            except redis_errors.ResponseError as exc:
                # An error reply: a SUBSCRIBE refused (an ACL without it, a proxy without
                # pub/sub). Fail the subscriptions waiting for a confirmation, at once.
                error = to_backend_error(exc)
                for confirmed in self._confirmations.values():
                    if not confirmed.done():
                        confirmed.set_exception(error)
                        confirmed.exception()
                continue
            except (redis_errors.RedisError, OSError, RuntimeError) as exc:
                failures += 1
                self._backend.errors += 1
                # Once per outage at warning level; the retries of the same outage at debug.
                level = logging.WARNING if failures == 1 else logging.DEBUG
                logger.log(level, "pub/sub connection failed (%s); retrying", exc)
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                self._on_message(channel, message["data"])
            elif kind == "subscribe":
                pending = self._confirmations.pop(channel, None)
                if pending is None:
                    # Subscribed again by redis-py after a reconnection: a fill published
                    # while the connection was down is lost, so listeners re-check now.
                    self._on_message(channel, b"")
                elif not pending.done():
                    pending.set_result(None)

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._connecting, self._reader):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for confirmed in self._confirmations.values():
            confirmed.cancel()
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._backend.command_timeout):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]


#: The channel Redis publishes invalidations on to a RESP2 redirect target.
INVALIDATION_CHANNEL: Final = b"__redis__:invalidate"


class TrackingConnection:
    """
    One RESP2 connection that tracks a key prefix for the L1's invalidation listener
    (`aiocacheguard.tracking`, which explains the protocol): ``CLIENT TRACKING ON REDIRECT
    <its own id> BCAST PREFIX <prefix>``, then ``SUBSCRIBE __redis__:invalidate``.

    RESP2 whatever the client speaks: redirected to a RESP3 connection, Redis sends
    invalidations as push frames, which redis-py 8.1's pub/sub drops without a word.

    Errors are the library's: `BackendUnavailable` / `BackendTimeout` when the connection is
    lost, `BackendError` when Redis refuses tracking (Redis < 6, an ACL).
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection

    @classmethod
    def factories(cls, client: RedisClient) -> list[Callable[[], TrackingConnection]]:
        """
        How to open the tracking connections ``client``'s keys need: one for a standalone or
        Sentinel client (the Sentinel pool finds the primary), one per primary of an
        initialized cluster (each primary announces the writes of its own slots only).
        """
        if isinstance(client, RedisCluster):
            return [
                functools.partial(cls._of, node.connection_class, node.connection_kwargs)
                for node in client.get_primaries()
            ]
        pool = client.connection_pool
        return [functools.partial(cls._of, pool.connection_class, pool.connection_kwargs)]

    @classmethod
    def _of(cls, connection_class: type[AbstractConnection], kwargs: dict[str, Any]) -> Self:
        # The pool's settings (address, credentials, TLS, database, Sentinel discovery), but
        # RESP2, bytes, and no health check or retry of its own: the listener judges liveness.
        kwargs = {
            **kwargs,
            "protocol": 2,
            "decode_responses": False,
            "health_check_interval": 0,
            "retry": Retry(NoBackoff(), 0),
        }
        return cls(connection_class(**kwargs))

    async def track(self, prefix: bytes) -> int:
        """Connect, track ``prefix`` redirected to this connection, subscribe; its client id."""
        connection = self._connection
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            await connection.send_command("CLIENT", "ID")
            client_id = int(await connection.read_response())
            await connection.send_command(
                "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", prefix
            )
            await connection.read_response()
            await connection.send_command("SUBSCRIBE", INVALIDATION_CHANNEL)
            reply = await connection.read_response()
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            raise to_backend_error(exc) from exc
        if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
            raise BackendUnavailable(f"unexpected reply to SUBSCRIBE: {reply!r}")
        return client_id

    async def receive(self, quiet_after: float) -> list[bytes] | Literal["quiet", "other"] | None:
        """
        The keys of the next invalidation (None: flush everything), ``"other"`` for another
        frame (a PONG), ``"quiet"`` when nothing came within ``quiet_after`` seconds.
        """
        try:
            message = await self._connection.read_response(timeout=quiet_after)
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            raise to_backend_error(exc) from exc
        if message is None:
            return "quiet"
        if (
            isinstance(message, list)
            and len(message) == 3
            and message[0] == b"message"
            and message[1] == INVALIDATION_CHANNEL
        ):
            keys = message[2]
            return None if keys is None else list(keys)
        return "other"

    async def ping(self) -> None:
        """Ask for a sign of life (its PONG comes back through `receive`)."""
        try:
            await self._connection.send_command("PING")
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            raise to_backend_error(exc) from exc

    async def close(self) -> None:
        """Drop the connection (its tracking goes with it)."""
        await self._connection.disconnect(nowait=True)
