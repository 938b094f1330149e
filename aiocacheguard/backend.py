"""
The only module that talks to Redis: command budgets, error mapping, and batching of reads.

Every command runs under ``asyncio.timeout(command_timeout)``, because redis-py's defaults wait
about a minute on a blackholed server (5 s socket timeout times its retries). Every ``redis`` and
``OSError`` error is translated here, in `map_errors`, into the library's `BackendError` tree.

Concurrent GETs are coalesced into MGETs and concurrent SETs into pipelines (DataLoader style):
commands queued in the same event-loop turn leave as one round trip, and at most
``max_in_flight`` commands are outstanding at once, so a default ``redis.asyncio.Redis()``
(whose pool raises ``MaxConnectionsError`` past 100 connections in redis-py 8) survives any
number of concurrent callers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import redis.asyncio as redis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from ._types import LuaScript, ScriptArg, Subscriber
from .errors import BackendError, BackendTimeout, BackendUnavailable, ConfigurationError

__all__ = ("RedisBackend", "RedisClient", "map_errors")

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
#: Batches of one kind (reads or writes) outstanding at once.
MAX_FLUSHERS = 4


def to_backend_error(exc: BaseException) -> BackendError:
    """The `BackendError` that stands for a redis-py or socket error."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, redis_errors.TimeoutError | TimeoutError):
        error: BackendError = BackendTimeout(
            f"Redis did not answer in time: {exc or 'command budget spent'}"
        )
    elif isinstance(exc, redis_errors.ConnectionError | OSError):
        error = BackendUnavailable(f"Redis is unreachable: {exc}")
    else:
        error = BackendError(f"Redis error: {exc}")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def map_errors() -> Iterator[None]:
    """Translate redis-py and socket errors into `BackendError` subclasses (the one seam)."""
    try:
        yield
    except (redis_errors.RedisError, OSError) as exc:
        raise to_backend_error(exc) from exc


class _Batcher(Generic[ItemT, ResultT]):
    """
    Coalesces concurrent single-item requests into batches (DataLoader style).

    Items submitted in the same event-loop turn leave together; while ``max_flushers`` batches
    are outstanding, new items queue and leave with the next one. A caller cancelled while
    queued is dropped from its batch; one cancelled after its batch left just stops waiting.
    """

    def __init__(
        self,
        flush: Callable[[list[ItemT]], Awaitable[Sequence[ResultT | BaseException]]],
        *,
        name: str,
        max_batch: int,
        max_flushers: int,
    ) -> None:
        self._flush = flush
        self._name = name
        self._max_batch = max_batch
        self._max_flushers = max_flushers
        self._queue: collections.deque[tuple[ItemT, asyncio.Future[ResultT]]] = collections.deque()
        self._flushers: set[asyncio.Task[None]] = set()
        self._scheduled = False

    async def submit(self, item: ItemT) -> ResultT:
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._scheduled and len(self._flushers) < self._max_flushers:
            self._scheduled = True
            task = asyncio.create_task(self._run(), name=f"aiocacheguard-{self._name}")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await future

    async def _run(self) -> None:
        while self._queue:
            self._scheduled = False
            batch: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
            while self._queue and len(batch) < self._max_batch:
                entry = self._queue.popleft()
                if not entry[1].done():  # its caller was cancelled while queued
                    batch.append(entry)
            if not batch:
                continue
            try:
                results = await self._flush([item for item, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(to_backend_error(exc))
                    else:
                        future.cancel()
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(to_backend_error(result))
                else:
                    future.set_result(result)

    async def aclose(self) -> None:
        for task in list(self._flushers):
            task.cancel()
        await asyncio.gather(*self._flushers, return_exceptions=True)
        while self._queue:
            self._queue.popleft()[1].cancel()


def _pool_limit(client: RedisClient) -> int | None:
    pool = getattr(client, "connection_pool", None)
    limit = getattr(pool, "max_connections", None)
    return limit if isinstance(limit, int) and limit > 0 else None


class RedisBackend:
    """
    Redis commands with budgets, bounded concurrency and batched reads.

    Args:
        client: A ready ``redis.asyncio`` client with ``decode_responses=False``.
        command_timeout: Seconds one command may take once it is sent.
        max_in_flight: Commands outstanding at once. Default: half the client's pool size,
            at most 50, so other users of the same client keep connections too.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        command_timeout: float,
        max_in_flight: int | None = None,
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
        elif (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or (max_in_flight < 1)
        ):
            raise ConfigurationError("max_in_flight", max_in_flight, "an integer >= 1")
        self.client = client
        self.command_timeout = command_timeout
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        flushers = min(MAX_FLUSHERS, max_in_flight)
        self._reads: _Batcher[bytes, bytes | None] = _Batcher(
            self._mget, name="mget", max_batch=MAX_BATCH, max_flushers=flushers
        )
        self._scripts: _Batcher[_ScriptCall, Any] = _Batcher(
            self._eval_batch, name="eval", max_batch=MAX_BATCH, max_flushers=flushers
        )
        self._pubsub: _PubSub | None = None
        #: Commands that failed or ran out of time, for `Statistics.redis_errors`.
        self.errors = 0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one command: wait for a slot, then spend at most ``command_timeout`` on it."""
        async with self._slots:
            try:
                with map_errors():
                    async with asyncio.timeout(self.command_timeout):
                        return await fn()
            except BackendError:
                self.errors += 1
                raise

    async def get(self, key: bytes) -> bytes | None:
        """GET ``key``, coalesced with the other reads of this turn into one MGET."""
        return await self._reads.submit(key)

    async def eval(
        self, script: LuaScript, keys: Sequence[bytes], args: Sequence[ScriptArg]
    ) -> Any:
        """
        Run ``script`` with EVALSHA, pipelined with this turn's other scripts.

        A script the server does not know (after SCRIPT FLUSH, a restart or a failover) is
        loaded and the call repeated, transparently.
        """
        return await self._scripts.submit((script, tuple(keys), tuple(args)))

    async def _mget(self, keys: list[bytes]) -> list[bytes | None]:
        client = self.client
        if len(keys) == 1:
            return [cast("bytes | None", await self.call(lambda: client.get(keys[0])))]
        if isinstance(client, RedisCluster):
            cluster = client
            values = await self.call(lambda: cluster.mget_nonatomic(keys))
        else:
            values = await self.call(lambda: client.mget(keys))
        return cast("list[bytes | None]", list(values))

    async def _eval_batch(self, calls: list[_ScriptCall]) -> list[Any]:
        results = await self._evalsha(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
        if missing:
            client = self.client
            for source in {calls[i][0].source for i in missing}:
                await self.call(functools.partial(client.script_load, source))
            again = await self._evalsha([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        self.errors += sum(isinstance(r, BaseException) for r in results)
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
                async with self._slots:
                    try:
                        async with asyncio.timeout(self.command_timeout):
                            return await cluster.evalsha(script.sha, len(keys), *keys, *args)
                    except (redis_errors.RedisError, OSError) as exc:
                        return exc

            return list(await asyncio.gather(*(one(c) for c in calls)))

        async def pipelined() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return list(await pipe.execute(raise_on_error=False))

        return await self.call(pipelined)

    def subscriber(self, on_message: Callable[[bytes, bytes], None]) -> Subscriber:
        """
        The Cache's one pub/sub connection; ``on_message(channel, data)`` is called for every
        message. Created on first use, closed by `aclose`.
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

    def prepare(self) -> None:
        """
        Open the connection in the background, once, so that the first waiter pays one round
        trip to subscribe instead of a connection set-up as well (under a stampede every round
        trip of the waiting path is one more for every caller).
        """
        if self._connecting is None:
            self._connecting = asyncio.create_task(
                self._connect(), name="aiocacheguard-pubsub-connect"
            )

    async def _connect(self) -> None:
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._backend.command_timeout):
                await self._pubsub.connect()  # type: ignore[no-untyped-call]

    async def subscribe(self, channel: bytes) -> None:
        loop = asyncio.get_running_loop()
        confirmed = self._confirmations.get(channel)
        if confirmed is None:
            confirmed = self._confirmations[channel] = loop.create_future()
        try:
            with map_errors():
                async with asyncio.timeout(self._backend.command_timeout):
                    if self._connecting is not None and not self._connecting.done():
                        await asyncio.shield(self._connecting)  # one connection, not two
                    await self._pubsub.subscribe(channel)
                    if self._reader is None or self._reader.done():
                        self._reader = asyncio.create_task(
                            self._read(), name="aiocacheguard-pubsub"
                        )
                    await asyncio.shield(confirmed)
        except BaseException:
            # Nobody waits for this confirmation any more: don't keep it around.
            if self._confirmations.get(channel) is confirmed:
                del self._confirmations[channel]
            raise

    async def unsubscribe(self, channel: bytes) -> None:
        with map_errors():
            async with asyncio.timeout(self._backend.command_timeout):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        failures = 0
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
                failures = 0
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
                confirmed = self._confirmations.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)

    async def aclose(self) -> None:
        for task in (self._connecting, self._reader):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for confirmed in self._confirmations.values():
            confirmed.cancel()
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._backend.command_timeout):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
