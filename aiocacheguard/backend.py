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
redis-py 8) survives any number of callers. A command's budget runs from when it is asked
for, its wait for a turn included. A batch waiting for its turn fails at once when one ahead
of it could not reach Redis, rather than spend a budget already known to be lost.

On a Redis Cluster, batches are made per primary (a `Route`) and each primary has a circuit
breaker of its own: a dead primary fails its own keys, and the keys of the others stay hits.

Reads are bounded by the Cache's ``max_value_bytes``: a value past it (written by a client
without the limit) is refused inside Redis, in the read's own round trip (`Read`): a lone read
is ``GETRANGE key 0 limit``, a batch the `READ_WITHIN` script (STRLEN before GET), a Cluster
node's pipeline GETRANGEs. So it is never transferred, never times a read out, and the circuit
breaker never hears of it. Without a limit, reads are plain GET and MGET.

A batch of reads that runs out of its budget (one huge value in it, say) is not failed as a
whole: each read is retried alone with a budget of its own, so one slow value fails alone (a
read in such a batch may take up to two budgets). Not when Redis itself is what is slow: a
retry still waiting for its turn when another batch times out or the circuit breaker opens
fails at once, so in an outage no caller waits much more than one budget.

A few paths go below redis-py's documented API (the Cluster read path's per-node pipelines,
the lone GET's own connection, the tracking connection, the slot map re-read): each internal
they use is checked by name and shape in tests/test_redis_py_internals.py, and pyproject.toml
bounds redis-py to the range that passes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
import types
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Final, Generic, Literal, NoReturn, Self, TypeGuard, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as redis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.observability.providers import get_observability_instance

from ._checks import check_instance, check_int
from ._episodes import Episode
from ._redact import redact, redact_url
from ._types import LuaScript, ScriptArg, Subscriber
from .errors import (
    AuthenticationError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CacheGuardError,
    ConfigurationError,
    InsecureTLSWarning,
    PermissionDeniedError,
)
from .guards.breaker import Breaker, BreakerState, CircuitBreaker

__all__ = (
    "FOREIGN",
    "INVALIDATION_CHANNEL",
    "RedisBackend",
    "RedisClient",
    "TrackingConnection",
    "budgeted",
    "client_from_url",
    "connect_url",
    "is_cluster",
    "sentinel_primary",
    "to_backend_error",
    "url_options",
    "warn_if_unverified",
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

#: Subscriptions left on the server when UNSUBSCRIBE is refused (an ACL) before the pub/sub
#: connection is dropped to end them, even while other channels are listened to.
MAX_STRANDED = 64

#: What `RedisBackend.get` returns for a key holding another Redis type (a hash, a list): bytes
#: no record starts with, so the Cache counts them as foreign and the next fill replaces them.
FOREIGN: Final = b""

#: What a read of one key gives: its bytes, None when it is missing, or, for a value larger
#: than the backend's ``max_value_bytes``, an int: the bytes it is known to have at least. Such
#: a value is refused inside Redis (its length is checked first, in the same round trip), so
#: it costs one short round trip, not its transfer, and is no failure of the node.
Read = bytes | int | None

# KEYS: the keys to read
# ARGV[1] the largest value returned (max_value_bytes), ARGV[2] the largest returned here
# Returns, in the keys' order: the value if it has at most ARGV[2] bytes; false (nil) for a
# missing key; "" for a key of another Redis type (`FOREIGN`); else the value's length, its
# bytes left in Redis: past ARGV[1] it is refused, else the caller reads it apart.
# STRLEN first: a GET would copy a huge value into Lua (blocking Redis meanwhile). Values past
# ARGV[2] are read apart because a value returned through Lua is copied twice more than by a
# MGET (measured for 100 keys: 1.9x a MGET's time at 2 KB, 2.4x at 10 KB, against 1.5x and
# 1.2x for the script and a MGET of those keys after it).
READ_WITHIN = LuaScript(
    "read_within",
    """
local inline = tonumber(ARGV[2])
local values = {}
for i, key in ipairs(KEYS) do
  local size = redis.pcall("STRLEN", key)
  if type(size) == "table" then
    values[i] = ""
  elseif size == 0 then
    values[i] = false
  elseif size > inline then
    values[i] = size
  else
    values[i] = redis.call("GET", key)
  end
end
return values
""",
)
#: Values up to this size come back in `READ_WITHIN`'s own reply; larger ones (up to
#: ``max_value_bytes``) are read in a second round trip, a MGET, where their copies through Lua
#: would cost more than the round trip does.
READ_INLINE = 1024

#: What redis-py and sockets raise. redis-py's cluster errors (a slot no node covers, say) do
#: not derive from RedisError.
_REDIS_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)

_NO_TIME: Final = "Redis did not answer in time"
_NO_TURN: Final = (
    "the command waited its whole budget for a turn (too many commands outstanding at once)"
)


#: How Redis words a refusal for lack of permission: NOPERM for a command, and from inside a
#: script (7.0: "The user executing the script can't ...", 7.2+: "ACL failure in script").
_DENIED = re.compile(rb"NOPERM|no permissions to|user executing the script can't|ACL failure in")
_ACL_HINT: Final = (
    "; `aiocacheguard acl --namespace NS` prints the ACL a Cache needs, "
    "`aiocacheguard doctor --namespace NS` says what this user lacks"
)


def _denied(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing the user a command, key or channel (not a failure)."""
    if isinstance(exc, redis_errors.NoPermissionError):
        return True
    return isinstance(exc, redis_errors.ResponseError) and bool(
        _DENIED.search(str(exc).encode(errors="replace"))
    )


def to_backend_error(exc: BaseException) -> BackendError:
    """The `BackendError` that stands for a redis-py or socket error."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(
        exc, redis_errors.AuthenticationError | redis_errors.AuthenticationWrongNumberOfArgsError
    ):  # (redis-py's derives from ConnectionError: Redis answered, it is not unreachable)
        error: BackendError = AuthenticationError(
            f"Redis refused the credentials: {exc}{_ACL_HINT}"
        )
    elif _denied(exc):
        error = PermissionDeniedError(f"Redis refused this user: {exc}{_ACL_HINT}")
    elif isinstance(exc, redis_errors.TimeoutError | TimeoutError):
        error = BackendTimeout(
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


def is_cluster(client: RedisClient) -> TypeGuard[RedisCluster]:
    """Whether ``client`` is a Redis Cluster client (every other module asks this here)."""
    return isinstance(client, RedisCluster)


def _node_of(cluster: RedisCluster, key: bytes) -> ClusterNode:
    """The primary serving ``key``'s slot in the client's slot map (no I/O)."""
    return cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key))


#: ``Redis.execute_command`` as this process first saw it: instrumentation that replaces it
#: later is noticed by identity, and one already in place by its name (`_lean_pool`).
_EXECUTE_COMMAND: Final = redis.Redis.execute_command
_REDIS_PY_OWN: Final = (
    type(_EXECUTE_COMMAND) is types.FunctionType
    and _EXECUTE_COMMAND.__module__ == "redis.asyncio.client"
    and _EXECUTE_COMMAND.__qualname__ == "Redis.execute_command"
)


def _lean_pool(client: RedisClient) -> redis.ConnectionPool | None:
    """
    The pool a lone GET may take its connection from itself (`RedisBackend._lean`), or None
    where that would always leave out something the client does around a command: a cluster
    client or a subclass, a single-connection client, or an ``execute_command`` that is not
    redis-py's own (instrumentation such as Sentry's replaces it on the class).
    """
    if type(client) is not redis.Redis or client.single_connection_client:
        return None
    return client.connection_pool if _REDIS_PY_OWN else None


#: The end of a bounded read's command (`_read_command`), made once: ``0 limit``, as bytes.
_Bounds = tuple[bytes, bytes]

#: A GETRANGE in RESP up to its key's length (`_send_get`).
_GETRANGE_HEAD: Final = b"*4\r\n$8\r\nGETRANGE\r\n$"


def _bounds(limit: int | None) -> _Bounds | None:
    return None if limit is None else (b"0", str(limit).encode())


def _packed_tail(bounds: _Bounds | None) -> bytes | None:
    """A bounded read's RESP after its key (`_send_get`), made once."""
    if bounds is None:
        return None
    start, end = bounds
    return b"\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(start), start, len(end), end)


def _pack_getrange(key: bytes, tail: bytes) -> bytes:
    """``GETRANGE key 0 limit`` in RESP, as redis-py would pack it (``tail``: `_packed_tail`)."""
    return b"".join((_GETRANGE_HEAD, b"%d" % len(key), b"\r\n", key, tail))


def _read_command(key: bytes, bounds: _Bounds | None) -> tuple[str | bytes, ...]:
    """
    The command reading one value: GET, or with a limit ``GETRANGE key 0 limit``, which
    answers at most ``limit + 1`` bytes however large the value (`_within` reads the answer).
    """
    return ("GET", key) if bounds is None else ("GETRANGE", key, *bounds)


def _within(data: bytes | None, limit: int | None) -> Read:
    """
    What a read by `_read_command` found: the value, None for a missing key (GETRANGE
    answers ``b""`` for one; a record is never empty), or, for a value past ``limit``, the
    bytes it is known to have at least (`Read`).
    """
    if limit is None or data is None:
        return data
    if not data:
        return None
    size = len(data)
    return size if size > limit else data


async def _send_get(connection: AbstractConnection, key: bytes, tail: bytes | None) -> Any:
    """
    One read (`_read_command`; bounded with the `_packed_tail` ``tail``) on ``connection``,
    as ``execute_command`` sends it (a health check included).

    A bounded read is packed here: its RESP is fixed but for the key, and so made in 0.2 us,
    where redis-py's packer takes 2.4 us (a GET's took 1.8 us), about 2 % of a lone hit.
    """
    if tail is None:
        packed: bytes | list[bytes] = connection.pack_command("GET", key)
    else:
        packed = _pack_getrange(key, tail)
    await connection.send_packed_command(packed)
    return await connection.read_response()


async def _retried(
    connection: AbstractConnection, key: bytes, tail: bytes | None, first: Exception
) -> Any:
    """
    A read whose first attempt failed with ``first``, under the connection's retry policy as
    ``execute_command`` runs it (attempts, errors retried, backoff, the connection dropped
    before each retry), ``first`` counted as its first attempt.
    """
    failed: Exception | None = first

    async def attempt() -> Any:
        nonlocal failed
        if failed is not None:
            error, failed = failed, None
            raise error
        return await _send_get(connection, key, tail)

    return await connection.retry.call_with_retry(attempt, lambda _: connection.disconnect())


def _is_wrongtype(exc: object) -> bool:
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("WRONGTYPE")


#: The loop may run a timer up to its clock's resolution early: the watchdog treats a deadline
#: that close as reached.
_WATCH_SLACK: Final = 0.001

#: Where a command goes: the name of the Redis Cluster primary that owns its key, or None
#: (a single Redis, or a cluster whose slot map is not known yet). Each route has its own fate:
#: its own batches, its own circuit breaker, its own fail-fast queue.
Route = str | None


class _Queued(Generic[ItemT, ResultT]):
    __slots__ = ("asked", "future", "item")

    def __init__(self, item: ItemT, future: asyncio.Future[ResultT], asked: float) -> None:
        self.item = item
        self.future = future
        self.asked = asked  # loop time when asked for: its budget runs from here


class _Batcher(Generic[ItemT, ResultT]):
    """
    Coalesces the requests of one event-loop turn into batches sent side by side, at most
    `MAX_BATCHES` of one kind at a time (and within ``max_in_flight``), one batch per route
    (on a Redis Cluster, per primary), so that a node that fails fails only its own keys.

    A request has one budget from the moment it is asked for, its wait for a turn included: a
    request still waiting for its turn when its budget runs out fails then, without I/O. The
    requests of a route still waiting when a batch finds the route unreachable, or when its
    circuit breaker opens, fail at once with that error instead of spending a budget already
    known to be lost. A caller cancelled while queued is dropped from its batch; one cancelled
    after its batch left stops waiting.

    With ``split_on_timeout`` (reads), a batch that runs out of time is not failed as a whole:
    its requests are retried one by one with a budget of their own, so that one huge value
    fails alone (a request may then take two budgets). In an outage the breaker opens after a
    few timeouts and ends those retries' waiting at once.
    """

    def __init__(
        self,
        backend: RedisBackend,
        flush: Callable[[list[ItemT]], Coroutine[Any, Any, Sequence[ResultT | BaseException]]],
        *,
        name: str,
        route: Callable[[ItemT], Route],
        split_on_timeout: bool,
    ) -> None:
        self._backend = backend
        self._flush = flush
        self._name = name
        self._route = route
        self._split = split_on_timeout
        self._queue: list[_Queued[ItemT, ResultT]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scheduled = False
        self._lanes = asyncio.Semaphore(MAX_BATCHES)
        #: Per route, requests in a batch that has not started its I/O yet, and in one that has.
        self._waiting: dict[Route, set[_Queued[ItemT, ResultT]]] = {}
        self._flying: dict[Route, set[_Queued[ItemT, ResultT]]] = {}

    async def submit(self, item: ItemT) -> ResultT:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._queue.append(_Queued(item, future, loop.time()))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        self._scheduled = False
        routes: dict[Route, list[_Queued[ItemT, ResultT]]] = {}
        for queued in self._queue:
            if not queued.future.done():
                routes.setdefault(self._route(queued.item), []).append(queued)
        self._queue.clear()
        budget = self._backend.command_timeout
        for route, live in routes.items():
            for start in range(0, len(live), MAX_BATCH):
                batch = live[start : start + MAX_BATCH]
                self._send(batch, route, batch[0].asked + budget)

    def _send(self, batch: list[_Queued[ItemT, ResultT]], route: Route, deadline: float) -> None:
        waiting = self._waiting.setdefault(route, set())
        waiting.update(batch)
        loop = asyncio.get_running_loop()
        expiry = loop.call_at(deadline, self._expire, batch, route)
        task = loop.create_task(
            self._run(batch, route, deadline, expiry), name=f"aiocacheguard-{self._name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expire(self, batch: list[_Queued[ItemT, ResultT]], route: Route) -> None:
        """The batch's budget went on waiting for a turn: nothing is said of Redis."""
        if any(not q.future.done() for q in batch):
            self._backend.errors += 1
            self._settle(batch, route, BackendTimeout(_NO_TURN))

    def _settle(
        self, batch: Iterable[_Queued[ItemT, ResultT]], route: Route, error: BackendError
    ) -> None:
        waiting, flying = self._waiting.get(route, set()), self._flying.get(route, set())
        for queued in batch:
            waiting.discard(queued)
            flying.discard(queued)
            if not queued.future.done():
                queued.future.set_exception(error)

    async def _run(
        self,
        batch: list[_Queued[ItemT, ResultT]],
        route: Route,
        deadline: float,
        expiry: asyncio.TimerHandle,
    ) -> None:
        backend = self._backend
        flying = self._flying.setdefault(route, set())
        try:
            async with self._lanes, backend.slots:
                expiry.cancel()
                self._waiting.get(route, set()).difference_update(batch)
                # Gone while waiting for a turn: cancelled, out of budget, or failed with the route.
                batch[:] = [q for q in batch if not q.future.done()]
                if not batch:
                    return
                refused = backend.refused(route)
                if refused is not None:  # the circuit breaker is open: no I/O, no budget spent
                    self._settle(batch, route, refused)
                    return
                flying.update(batch)
                results = await self._flush_within(batch, route, deadline)
        finally:
            expiry.cancel()
            flying.difference_update(batch)
        if results is None:
            return
        unreachable = None
        for queued, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                backend.errors += 1
                backend.note(result)
                error = to_backend_error(result)
                if isinstance(error, BackendUnavailable | BackendTimeout):
                    unreachable = error
                if not queued.future.done():
                    queued.future.set_exception(error)
            elif not queued.future.done():
                queued.future.set_result(result)
        self._record(unreachable, route)

    async def _flush_within(
        self, batch: list[_Queued[ItemT, ResultT]], route: Route, deadline: float
    ) -> Sequence[ResultT | BaseException] | None:
        try:
            return await self._until(deadline, self._flush([q.item for q in batch]))
        except TimeoutError:
            if self._split and len(batch) > 1:
                # One slow value (a huge one) must not fail the reads batched with it: each
                # is read again alone with a budget of its own, unless the breaker opens.
                self._backend.errors += 1
                retry_deadline = asyncio.get_running_loop().time() + self._backend.command_timeout
                for queued in batch:
                    self._send([queued], route, retry_deadline)
                self._record(BackendTimeout("batch"), route)
                return None
            self._fail(batch, route, BackendTimeout(_NO_TIME))
        except _REDIS_ERRORS as exc:
            self._fail(batch, route, to_backend_error(exc))
        except BaseException:
            for queued in batch:
                queued.future.cancel()
            raise
        return None

    async def _until(self, deadline: float, command: Coroutine[Any, Any, T]) -> T:
        """
        ``command``'s result, or TimeoutError at ``deadline`` (loop time) whatever it does.

        It runs in a task of its own that is cancelled, not awaited, at the deadline: redis-py
        8.1 writes each command under ``asyncio.wait_for(..., socket_timeout)`` (5 s by
        default), and Python 3.11's ``wait_for`` loses a cancellation that arrives as the
        write completes (CPython gh-86296, fixed in 3.12). The command then goes on to wait
        for its reply under redis-py's own timeout and retries: about a minute behind a
        blackhole, past any ``asyncio.timeout`` of ours (reproduced with a bare client: a few
        of fifty concurrent commands). The callers of a batch must not wait for that; `aclose`
        cancels such a task again until it ends.
        """
        task = asyncio.create_task(command, name=f"aiocacheguard-{self._name}-command")
        try:
            done, _ = await asyncio.wait((task,), timeout=deadline - task.get_loop().time())
        except BaseException:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise TimeoutError
        return task.result()

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        task.add_done_callback(_retrieve)
        if not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fail(
        self, batch: list[_Queued[ItemT, ResultT]], route: Route, error: BackendError
    ) -> None:
        self._backend.errors += 1
        self._backend.note(error)
        self._settle(batch, route, error)
        if isinstance(error, BackendUnavailable):  # unreachable: so for the route's queue
            self._settle(list(self._waiting.get(route, ())), route, error)
        self._record(error, route)

    def _record(self, error: BackendError | None, route: Route) -> None:
        """
        Tell the route's breaker. Once it opens, every request of the route still waiting for
        a turn or for an answer fails at once: Redis is taken for unreachable, and a caller
        must not wait out a budget that the breaker's decision has made pointless.
        """
        backend = self._backend
        backend.record(error, route)
        if error is not None:
            refused = backend.refused(route, probe=False)
            if refused is not None:
                pending = self._waiting.get(route, set()) | self._flying.get(route, set())
                self._settle(pending, route, refused)

    async def aclose(self) -> None:
        for queued in self._queue:
            queued.future.cancel()
        self._queue.clear()
        # Cancelled again and again until they end (see `_until`), for one budget at most.
        deadline = asyncio.get_running_loop().time() + self._backend.command_timeout
        while self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(set(self._tasks), timeout=0.05)
            if asyncio.get_running_loop().time() >= deadline:
                break


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Read a finished task's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def client_from_url(url: str) -> redis.Redis:
    """
    A client for ``url`` with redis-py's own retries off, so that one command spends one
    budget (see `RedisBackend`).

    Raises:
        ConfigurationError: the URL is not one redis-py understands (the password is never
            in the error: see `aiocacheguard._redact`).
    """
    return cast(redis.Redis, _from_url(url, redis.Redis, retry=Retry(NoBackoff(), 0)))


def connect_url(url: str, *, cluster: bool = False, **options: Any) -> RedisClient:
    """
    A client for a ``redis://``, ``rediss://`` or ``unix://`` URL (a cluster client with
    ``cluster``), with redis-py's ``options``: the command line's clients.

    Raises:
        ConfigurationError: redis-py cannot use the URL (the password is never in the error).
    """
    client: RedisClient = _from_url(url, RedisCluster if cluster else redis.Redis, **options)
    return client


def _from_url(url: str, kind: type[redis.Redis] | type[RedisCluster], **options: Any) -> Any:
    # Raised outside the except block: redis-py's error must not ride along as __context__,
    # since it can quote a piece of a malformed password ("... integer value as 'pa'").
    try:
        client = kind.from_url(url, **options)
    except ValueError as exc:
        problem = redact(str(exc), url)
    else:
        warn_if_unverified(url_options(urlsplit(url).query))
        return client
    raise ConfigurationError(
        "url", redact_url(url), f"a redis://, rediss:// or unix:// URL ({problem})"
    )


def url_options(query: str) -> dict[str, Any]:
    """
    A URL's query (``ssl_ca_certs=/etc/ca.pem&socket_timeout=2``) as connection options, each
    typed as redis-py types it in a ``redis://`` URL; ``ssl=true`` asks for TLS (for a
    ``redis+sentinel://`` URL, which has no ``rediss`` form).

    Raises:
        ValueError: a value is not of its option's type (the message names the option only).
    """
    options: dict[str, Any] = dict(parse_url(f"redis://localhost/?{query}"))
    options.pop("host", None)
    ssl = options.pop("ssl", None)
    if ssl is not None:
        flag = _FLAGS.get(str(ssl).lower())
        if flag is None:
            raise ValueError("Invalid value for 'ssl' in connection URL (true or false).")
        options["ssl"] = flag
    return options


_FLAGS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def warn_if_unverified(options: dict[str, Any]) -> None:
    """
    Warn (`InsecureTLSWarning`) when ``options`` turn certificate verification off: TLS that
    verifies nothing keeps passive listeners out, and lets anyone on the path in. The message
    never changes, so Python's default filter shows it once per process.
    """
    reqs = options.get("ssl_cert_reqs")
    if reqs == ssl.CERT_NONE or (isinstance(reqs, str) and reqs.lower() == "none"):
        warnings.warn(
            "ssl_cert_reqs=none: Redis's TLS certificate is not verified, so anyone on the "
            "network path can pose as Redis and read the traffic, password included; give "
            "the CA instead (ssl_ca_certs=/path/to/ca.pem)",
            InsecureTLSWarning,
            stacklevel=2,
        )


def sentinel_primary(
    sentinels: list[tuple[str, int]], service: str, db: int, **options: Any
) -> redis.Redis:
    """A client for the primary the Sentinels name for ``service``, followed through failovers
    (``options`` for the primary and the Sentinels alike: credentials, ``ssl=True``,
    ``ssl_ca_certs``...)."""
    warn_if_unverified(options)
    sentinel = redis.Sentinel(sentinels, sentinel_kwargs=dict(options), **options)
    return cast(redis.Redis, sentinel.master_for(service, db=db))


def _pool_limit(client: RedisClient) -> int | None:
    pool = getattr(client, "connection_pool", None)
    limit = getattr(pool, "max_connections", None)
    return limit if isinstance(limit, int) and limit > 0 else None


class RedisBackend:
    """
    Redis commands with budgets, bounded concurrency and batching.

    On a Redis Cluster every primary is a route of its own: reads and scripts are batched per
    primary, and each primary has its own circuit breaker (`CircuitBreaker.sibling` of
    ``breaker``), so a dead node fails its own keys only while the others keep being read.
    ``breaker`` itself guards what has no node yet (a cluster whose slot map is unknown).

    Args:
        client: A ready ``redis.asyncio`` client with ``decode_responses=False``.
        command_timeout: Seconds one command may take, from being asked for to its answer.
        max_in_flight: Commands (or batches) outstanding at once. Default: half the client's
            pool size, at most 50, so other users of the same client keep connections too.
        max_value_bytes: The largest value a read returns; a larger one is refused inside
            Redis and read as its length (`Read`). None: no limit, plain GET and MGET.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        command_timeout: float,
        max_in_flight: int | None = None,
        breaker: CircuitBreaker | None = None,
        max_value_bytes: int | None = None,
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
        self.max_value_bytes = max_value_bytes
        self._bounds = _bounds(max_value_bytes)
        self._tail = _packed_tail(self._bounds)
        self._cluster = client if is_cluster(client) else None
        self._pool = _lean_pool(client)
        # The lone command running (`_direct`), its deadline, and the one timer watching it.
        self._lone: asyncio.Task[Any] | None = None
        self._lone_deadline = 0.0
        self._lone_fired = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None
        self._failed_node: str | None = None  # a cluster primary a read failed on, asked last
        self._breakers: dict[str, CircuitBreaker] = {}  # a cluster primary's, by its name
        self.command_timeout = command_timeout
        self.max_in_flight = max_in_flight
        self.slots = asyncio.Semaphore(max_in_flight)
        self._cluster_slots = asyncio.Semaphore(max_in_flight)
        self._outstanding = 0
        self._reads: _Batcher[bytes, Read] = _Batcher(
            self, self._mget, name="mget", route=self.route, split_on_timeout=True
        )
        self._scripts: _Batcher[_ScriptCall, Any] = _Batcher(
            self,
            self._eval_batch,
            name="eval",
            route=lambda call: self.route(call[1][0]) if call[1] else None,
            split_on_timeout=False,
        )
        self._pubsub: _PubSub | None = None
        #: Commands that failed or ran out of time, for `Statistics.redis_errors`.
        self.errors = 0
        #: Writes Redis refused (OOM under noeviction, READONLY): `Statistics.writes_refused`.
        self.writes_refused = 0
        # Refused writes less than a minute apart are one episode: one warning, a count a minute.
        self._refusals = Episode("writes to Redis")
        #: Commands, keys, channels or credentials Redis refused this client's user, and
        #: permissions the start-up check found missing: `Statistics.permission_errors`.
        self.permission_errors = 0
        self._denials = Episode("commands refused for lack of permission")

    @classmethod
    def of(
        cls,
        client: RedisClient,
        command_timeout: float,
        max_in_flight: int | None,
        breaker: Breaker | None,
        on_transition: Callable[[BreakerState, BreakerState, str | None], None] | None = None,
        *,
        max_value_bytes: int | None = None,
    ) -> RedisBackend:
        """A backend with a circuit breaker of its own (a replica's failures say nothing of
        its primary's, so each client gets one)."""
        check_instance("breaker", breaker, Breaker, optional=True)
        circuit = None
        if breaker is not None:
            circuit = CircuitBreaker(breaker, on_transition=on_transition)
        return cls(
            client,
            command_timeout=command_timeout,
            max_in_flight=max_in_flight,
            breaker=circuit,
            max_value_bytes=max_value_bytes,
        )

    def counters(self) -> dict[str, int]:
        """This backend's share of a Cache's statistics (every breaker's, on a cluster)."""
        breakers = self.breakers()
        return {
            "redis_errors": self.errors,
            "pubsub_renewals": 0 if self._pubsub is None else self._pubsub.renewals,
            "writes_refused": self.writes_refused,
            "permission_errors": self.permission_errors,
            "breaker_opened": sum(b.opened for b in breakers),
            "short_circuited": sum(b.short_circuited for b in breakers),
        }

    def breakers(self) -> list[CircuitBreaker]:
        """Every circuit breaker of this backend: ``breaker``, then one per cluster primary."""
        return ([] if self.breaker is None else [self.breaker]) + list(self._breakers.values())

    def route(self, key: bytes) -> Route:
        """
        The name of the cluster primary that owns ``key``; None on a single Redis, or while
        the cluster's slot map is not known (a sync lookup in the client's map, no I/O).
        """
        cluster = self._cluster
        if cluster is None:
            return None
        try:
            return _node_of(cluster, key).name
        except (redis_errors.RedisClusterException, LookupError, TypeError, AttributeError):
            return None

    def _breaker(self, route: Route) -> CircuitBreaker | None:
        breaker = self.breaker
        if route is None or breaker is None:
            return breaker
        node = self._breakers.get(route)
        if node is None:
            node = self._breakers[route] = breaker.sibling(route)
        return node

    def refused(self, route: Route = None, *, probe: bool = True) -> BackendUnavailable | None:
        """
        The error to fail with at once while the circuit breaker refuses calls, else None.
        With ``probe=False`` only an open breaker refuses, and asking is not a call: it is
        neither counted as short-circuited nor let through as a half-open probe.
        """
        breaker = self._breaker(route)
        if breaker is None:
            return None
        if probe:
            if breaker.allow():
                return None
        elif breaker.state is not BreakerState.OPEN:
            return None
        where = "Redis" if route is None else f"Redis Cluster node {route}"
        return BackendUnavailable(
            f"{where} is treated as unreachable: the circuit breaker is open after repeated "
            f"failures; it lets a call through again {breaker.config.open_for:g}s after opening"
        )

    def record(self, error: BackendError | None, route: Route = None) -> None:
        """Tell the breaker (of ``route``) how a call it let through ended."""
        breaker = self._breaker(route)
        if breaker is not None:
            breaker.record(not isinstance(error, BackendUnavailable | BackendTimeout))

    def note(self, exc: BaseException) -> None:
        """
        Count writes Redis refused, and commands it refused this user (`denied`); each said
        once per episode (a refusal after a quiet minute starts a new one) and summed up each
        minute while it lasts, not once per command.
        """
        error = to_backend_error(exc)
        if isinstance(error, PermissionDeniedError):
            self.denied(
                f"{error} (while this lasts, what needs it fails or is skipped: loaded "
                "values are served but not cached)"
            )
            return
        cause = error.__cause__
        if not isinstance(cause, redis_errors.OutOfMemoryError | redis_errors.ReadOnlyError):
            return
        exc = cause
        self.writes_refused += 1
        self._refusals.failed(
            f"Redis refuses writes ({type(exc).__name__}: {exc}): values are served but not "
            f"cached until it accepts them again ({self.writes_refused} refused so far)"
        )

    def denied(self, detail: str, count: int = 1) -> None:
        """
        Redis refused this user something (``detail`` says what; ``count`` things): a
        configuration error, not a failure of Redis, so the breaker is not told. Counted;
        said once per episode.
        """
        self.permission_errors += count
        self._denials.failed(f"{detail} ({self.permission_errors} permission errors so far)")

    async def _direct(self, command: Callable[[], Awaitable[T]], route: Route = None) -> T:
        """
        One command in the caller's task, under its budget (none while the breaker is open).

        The hit path of a lone caller, so it is lean: no slot is taken (nothing else of this
        backend is outstanding, so at most ``max_in_flight + 1`` commands are), and the budget
        is kept by one watchdog timer per backend (`_watch`), not by an ``asyncio.timeout`` or a
        timer per command (which cost about as much as the rest of the library's share of a
        hit). A lone command starts only when nothing else is outstanding, so one runs at a
        time. Its semantics are asyncio.timeout's: a cancellation from elsewhere stays a
        cancellation.
        """
        breaker = self._breaker(route)
        if breaker is not None and breaker.state is not BreakerState.CLOSED:
            refused = self.refused(route)  # (a closed breaker allows every call, as is)
            if refused is not None:
                raise refused
        task = asyncio.current_task()
        if task is None or self._lone is not None:  # (not an assert: python -O drops those)
            raise CacheGuardError("a lone command runs in a task, and one at a time")
        loop = asyncio.get_running_loop()
        self._lone = task
        self._lone_fired = False
        deadline = self._lone_deadline = loop.time() + self.command_timeout
        if self._watchdog is None or self._watch_loop is not loop:  # (a loop that ended: anew)
            self._watchdog, self._watch_loop = loop.call_at(deadline, self._watch), loop
        try:
            result = await command()
        except asyncio.CancelledError:
            if self._lone_fired and task.uncancel() == 0:  # the watchdog's, and nobody else's
                exc: BaseException = TimeoutError()
                self._failed(exc, route)
            raise
        except _REDIS_ERRORS as exc:
            if self._lone_fired:
                task.uncancel()  # the budget ran out as the command failed: not a cancellation
            self._failed(exc, route)
        finally:
            self._lone = None
        if self._lone_fired:
            task.uncancel()  # the budget ran out as the command completed: the result stands
        if breaker is not None:
            breaker.record(True)
        return result

    def _watch(self) -> None:
        """
        The watchdog of lone commands: cancel the one running if its budget is spent, else
        wake again at its deadline; with none running, sleep until the next one starts. Under
        a steady stream of hits it wakes once a budget, not once a command.
        """
        self._watchdog = None
        task = self._lone
        if task is None:
            return
        loop = asyncio.get_running_loop()
        if self._lone_deadline - loop.time() <= _WATCH_SLACK:
            self._lone_fired = True
            task.cancel()
        else:
            self._watchdog = loop.call_at(self._lone_deadline, self._watch)

    def _failed(self, exc: BaseException, route: Route) -> NoReturn:
        self.errors += 1
        error = to_backend_error(exc)
        self.record(error, route)
        self.note(exc)
        raise error from exc

    async def get(self, key: bytes) -> Read:
        """
        Read ``key`` (`FOREIGN` for a key of another type; the length of one past
        ``max_value_bytes``, see `Read`): straight to Redis when nothing else is outstanding,
        else batched.
        """
        self._outstanding += 1
        try:
            if self._outstanding == 1:  # nothing to coalesce with
                if self._cluster is None:
                    return await self._direct(functools.partial(self._get_lone, key))
                return await self._direct(lambda: self._read_one(key), self.route(key))
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
                route = self.route(call[1][0]) if keys else None
                return await self._direct(lambda: self._evalsha_loading(call), route)
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

    async def _get_lone(self, key: bytes) -> Read:
        """
        The lone read (`_direct`): where nothing would be left out (`_lean`), on a connection
        borrowed from the client's pool, not through ``execute_command``, whose retry wrapper
        and metrics hooks cost a lone hit about as much again as the library's own share.

        What the client does for a command is kept: the pool lends and takes back the
        connection (its checks, its failover and credential handling), the client's retry
        policy is followed (its attempts, errors and backoff, the connection dropped before
        each retry), and a cancelled or failed read drops the connection (redis-py's own
        doing), so no reply is left to cross. Not kept between GETs: a connection held out of
        the pool misses what the pool does to idle ones (a Sentinel failover's disconnect,
        rotated credentials, reconnects it marks).
        """
        pool = self._lean()
        if pool is None:
            return await self._get_standalone(key)
        tail = self._tail
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                try:
                    data = await _send_get(connection, key, tail)
                except Exception as exc:  # the policy says what is retried: its first attempt
                    data = await _retried(connection, key, tail, exc)
            finally:
                await pool.release(connection)
            return _within(data, self.max_value_bytes)
        except redis_errors.ResponseError as exc:
            if _is_wrongtype(exc):
                return FOREIGN
            raise

    async def _get_standalone(self, key: bytes) -> Read:
        """One read on a single Redis, through the client (the lone read's is `_get_lone`)."""
        limit, client = self.max_value_bytes, self.client
        try:
            if limit is None:
                return cast("bytes | None", await client.get(key))
            return _within(cast("bytes", await client.getrange(key, 0, limit)), limit)
        except redis_errors.ResponseError as exc:
            if _is_wrongtype(exc):
                return FOREIGN
            raise

    def _lean(self) -> redis.ConnectionPool | None:
        """
        `_lean_pool`, unless since then ``execute_command`` was replaced on the class or
        patched on the client (``mock.patch.object``), ``get`` or ``getrange`` patched on the
        client, or redis-py's own metrics turned on: checked at each read, for a few attribute
        reads.
        """
        pool = self._pool
        if pool is None or redis.Redis.execute_command is not _EXECUTE_COMMAND:
            return None
        patched = self.client.__dict__
        if "execute_command" in patched or "get" in patched or "getrange" in patched:
            return None
        try:
            if get_observability_instance().get_provider_manager() is not None:
                return None
        except Exception:  # whatever redis-py's metrics do, the client's own path is safe
            return None
        return pool

    async def _read_one(self, key: bytes) -> Read:
        (value,) = await self._mget([key])
        if isinstance(value, BaseException):
            raise value
        return value

    async def _mget(self, keys: list[bytes]) -> list[Read | BaseException]:
        """
        What each of ``keys`` holds (`Read`; `FOREIGN` for a key of another type, where Redis
        says so: a MGET answers nil for those), or in its place the error of a cluster node
        that failed.

        With ``max_value_bytes``, one `READ_WITHIN` script instead of the MGET, so that a value
        past the limit stays in Redis; values too large for its reply (past `READ_INLINE`)
        but within the limit are read in a second round trip, a MGET. (A value replaced by one
        past the limit between the two is transferred then, once, and still refused: `_within`.)
        """
        client = self.client
        if is_cluster(client):
            return await self._read_cluster(client, keys)
        if len(keys) == 1:
            return [await self._get_standalone(keys[0])]
        limit = self.max_value_bytes
        if limit is None:
            return cast("list[Read | BaseException]", list(await client.mget(keys)))
        inline = min(limit, READ_INLINE)
        results: list[Read | BaseException] = await self._evalsha_loading(
            (READ_WITHIN, tuple(keys), (limit, inline))
        )
        apart = [i for i, r in enumerate(results) if isinstance(r, int) and r <= limit]
        if apart:
            read = cast("list[bytes | None]", await client.mget([keys[i] for i in apart]))
            for i, data in zip(apart, read, strict=True):
                results[i] = _within(data, limit)
        return results

    async def _read_cluster(
        self, cluster: RedisCluster, keys: list[bytes]
    ) -> list[Read | BaseException]:
        """
        Read ``keys`` on a cluster (`_read_command`, bounded by ``max_value_bytes``): one
        pipeline per primary (normally one: batches are made per route), each with its own fate.

        Not through the cluster client's ``mget_nonatomic``: its pipeline fails as a whole
        when one node fails, and before failing it closes the connections to every node
        (``RedisCluster.aclose``) and sleeps, so one dead primary took the reads of the healthy
        ones with it. What redis-py does for a failed node is kept: the map is read again
        before the next read, and the failed node is asked for it last (redis-py asks the
        others in random order).
        """
        # A no-op unless a failure asked for a new slot map.
        failed, self._failed_node = self._failed_node, None
        await cluster.initialize(last_failed_node_name=failed)
        limit, bounds = self.max_value_bytes, self._bounds
        results: list[Read | BaseException] = [None] * len(keys)
        nodes: dict[str, tuple[ClusterNode, list[PipelineCommand]]] = {}
        for position, key in enumerate(keys):
            try:
                node = _node_of(cluster, key)
            except redis_errors.RedisClusterException as exc:  # a slot no node serves
                results[position] = exc
                continue
            command = PipelineCommand(position, *_read_command(key, bounds))
            nodes.setdefault(node.name, (node, []))[1].append(command)

        async def read(node: ClusterNode, commands: list[PipelineCommand]) -> None:
            try:
                await node.execute_pipeline(commands)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                cluster.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
                self._failed_node = node.name
                # As redis-py's own commands do on this error; `aclose` reads the map if no
                # read comes first (see `_reread_slot_map`).
                cluster._initialize = True
                for command in commands:
                    results[command.position] = exc
                return
            for command in commands:
                result = command.result
                if isinstance(result, redis_errors.ResponseError):
                    if _is_wrongtype(result):
                        result = FOREIGN
                    elif isinstance(result, redis_errors.MovedError | redis_errors.AskError):
                        result = await self._read_redirected(cluster, command.args[1])
                elif not isinstance(result, BaseException):
                    result = _within(result, limit)
                results[command.position] = result

        await asyncio.gather(*(read(node, commands) for node, commands in nodes.values()))
        return results

    async def _read_redirected(self, cluster: RedisCluster, key: bytes) -> Read | Exception:
        """A key whose slot moved: through the cluster client, which follows the redirect and
        updates its slot map."""
        command = _read_command(key, self._bounds)
        try:
            return _within(await cluster.execute_command(*command), self.max_value_bytes)
        except redis_errors.ResponseError as exc:
            return FOREIGN if _is_wrongtype(exc) else exc
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            return exc

    async def _reread_slot_map(self, cluster: RedisCluster) -> None:
        """
        Read the cluster's slot map now if a connection error asked for it, so that the client
        can be closed.

        A command that finds its node unreachable marks the client to read the slot map again
        before its next command (``_initialize``): redis-py's own commands do (the scripts, a
        redirected read), and so does `_read_cluster`. While that mark is set, redis-py 8.1's
        ``RedisCluster.aclose()`` returns without closing anything, so a client closed after
        the Cache kept every connection to every node open. The re-read its next command would
        do first is done here, under one budget: it clears the mark, or, failing, redis-py
        closes every connection itself. A client never initialized or already closed (it has
        no default node then) is left alone: reading the map would open connections again.
        """
        if not cluster._initialize or cluster.nodes_manager.default_node is None:
            return
        with contextlib.suppress(BackendError):
            await budgeted(cluster.initialize(), self.command_timeout)

    async def _eval_batch(self, calls: list[_ScriptCall]) -> list[Any]:
        results = await self._evalsha(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
        if missing:
            for source in {calls[i][0].source for i in missing}:
                await self.client.script_load(source)
            again = await self._evalsha([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results  # errors in place: counted and noted by the batcher with the others

    async def _evalsha(self, calls: list[_ScriptCall]) -> list[Any]:
        client = self.client
        if is_cluster(client):
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
        message, with ``b""`` data when a channel is subscribed again after a reconnection
        (messages may have been missed), and as ``on_message(b"", b"")`` when a silent
        connection was replaced (any channel may have missed some). Created on first use,
        closed by `aclose`.
        """
        if self._pubsub is None:
            self._pubsub = _PubSub(self, on_message)
        return self._pubsub

    async def aclose(self) -> None:
        """
        Stop the batchers and the subscriber; queued commands are cancelled. A cluster client
        is left in a state its own ``aclose()`` closes (`_reread_slot_map`).
        """
        if self._watchdog is not None and self._lone is None:  # else it still keeps a budget
            self._watchdog.cancel()
            self._watchdog = None
        await self._reads.aclose()
        await self._scripts.aclose()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._cluster is not None:
            await self._reread_slot_map(self._cluster)


#: Seconds of silence on the fill notifications' pub/sub connection after which it is
#: PINGed, and the time the reply has to come before the connection counts as dead (frozen:
#: a dropped NAT or load-balancer entry keeps TCP open while nothing flows) and is replaced.
#: Two of them bound how long waiters can go unnotified; a PING each on an idle connection.
PUBSUB_HEALTH_INTERVAL: Final = 0.5


class _PubSub:
    """
    One pub/sub connection shared by every waiter of a Cache, with a reader task.

    Subscribing waits for Redis's confirmation, so a PUBLISH that follows can't be missed.
    redis-py reconnects and resubscribes by itself after an error; messages sent while
    disconnected are lost, which waiters tolerate because each wait is also bounded by the
    lock's remaining lease, and because every channel subscribed again is announced to
    ``on_message`` with empty data, so its waiters re-check Redis.

    A connection that fails silently (open, but nothing flows) raises no error: the reader
    PINGs it after a quiet ``health_interval`` and, if nothing at all came back within
    another, replaces it, subscribes every channel again and calls ``on_message(b"", b"")``
    so that every waiter re-checks Redis. Counted in ``renewals``, said once per episode.
    """

    def __init__(self, backend: RedisBackend, on_message: Callable[[bytes, bytes], None]) -> None:
        self._backend = backend
        self._on_message = on_message
        self._pubsub = backend.client.pubsub()
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False
        # Sends, connecting and the renewal, one at a time on the connection: a renewal must
        # not reconnect under a SUBSCRIBE half sent, nor lose a channel sent but not noted.
        self._sending = asyncio.Lock()
        # Failures and renewals less than a minute apart are one episode: one warning.
        self._episode = Episode("pub/sub connections of fill notifications")
        self._ping_refused = False  # said once
        #: Seconds of silence before a PING, and the time its reply has (tests lower it).
        self.health_interval: float = PUBSUB_HEALTH_INTERVAL
        #: Times the connection was found silent and replaced (`Statistics.pubsub_renewals`).
        self.renewals = 0
        # An ACL that allows SUBSCRIBE but refuses UNSUBSCRIBE: each channel left stays
        # subscribed on the server. They are counted here and dropped with the connection
        # (`_drop_stranded`), so they stay bounded.
        self._cannot_unsubscribe = False
        self._stranded = 0

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
            async with asyncio.timeout(self._backend.command_timeout), self._sending:
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
                async with self._sending:
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
        if self._cannot_unsubscribe:  # it would be refused again: strand it, drop them all
            self._pubsub.channels.pop(channel, None)
            self._stranded += 1
            await self._drop_stranded()
            return
        try:
            async with asyncio.timeout(self._backend.command_timeout), self._sending:
                await self._pubsub.unsubscribe(channel)
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            raise to_backend_error(exc) from exc

    def _unsubscribe_refused(self, error: BackendError) -> None:
        """
        Redis refused UNSUBSCRIBE (an ACL): the channels asked to be left stay subscribed on
        the server. Forget them here, so that a new connection does not subscribe them again.
        """
        self._backend.note(error)
        self._cannot_unsubscribe = True
        pubsub = self._pubsub
        for channel in pubsub.pending_unsubscribe_channels:
            pubsub.channels.pop(channel, None)
            self._stranded += 1
        pubsub.pending_unsubscribe_channels.clear()

    async def _drop_stranded(self) -> None:
        """
        Drop the connection, and with it every stranded subscription, once no channel is
        listened to any more, or once `MAX_STRANDED` are left. Channels still listened to
        are subscribed again on the new connection (whose confirmations wake their
        listeners to re-check). UNSUBSCRIBE is tried again on the new one: the ACL may
        have been fixed meanwhile.
        """
        pubsub = self._pubsub
        if pubsub.channels and self._stranded < MAX_STRANDED:
            return
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._cannot_unsubscribe, self._stranded = False, 0
        connection = cast("AbstractConnection | None", pubsub.connection)
        if connection is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await connection.disconnect()
        if pubsub.channels and not self._reading():
            # A new connection, subscribed to the channels listened to again as it opens.
            self._reader = asyncio.create_task(self._read(), name="aiocacheguard-pubsub")

    def _reading(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        answer_by: float | None = None  # while a PING is out: when the connection is judged
        while True:
            try:
                wait = self.health_interval if answer_by is None else answer_by - loop.time()
                message = await self._pubsub.get_message(timeout=max(wait, 0.0))
                failures = 0
                if message is None:  # quiet (or a frame redis-py kept for itself)
                    if answer_by is None:
                        answer_by = loop.time() + self.health_interval
                        await self._ping()
                    elif loop.time() >= answer_by:
                        answer_by = None
                        await self._renew()
                    continue
            except redis_errors.ResponseError as exc:
                # An error reply, a reply all the same: the connection lives.
                answer_by = None
                if "'ping' command" in str(exc):  # the health PING denied by an ACL: said once
                    if not self._ping_refused:
                        self._ping_refused = True
                        logger.warning(
                            "pub/sub connection: Redis refuses its health PING (%s); the "
                            "error reply is taken as the sign of life. Allow PING to this user.",
                            exc,
                        )
                    continue
                # A SUBSCRIBE refused (an ACL without it, a proxy without pub/sub).
                error = to_backend_error(exc)
                if isinstance(error, PermissionDeniedError) and "'unsubscribe'" in str(exc):
                    self._unsubscribe_refused(error)
                    continue
                for confirmed in self._confirmations.values():
                    if not confirmed.done():
                        confirmed.set_exception(error)
                        confirmed.exception()
                continue
            except (redis_errors.RedisError, OSError, RuntimeError, TimeoutError) as exc:
                failures += 1
                answer_by = None
                self._backend.errors += 1
                self._episode.failed(f"pub/sub connection failed ({exc}); retrying")
                if failures > 1:
                    logger.debug("pub/sub connection failed (%s); retrying", exc)
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            answer_by = None  # any frame proves the connection alive
            self._episode.succeeded()
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

    async def _ping(self) -> None:
        async with asyncio.timeout(self._backend.command_timeout), self._sending:
            await self._pubsub.ping()

    async def _renew(self) -> None:
        """
        The connection is silent (its PING unanswered): replace it, subscribe every channel
        again, and wake every waiter to re-read Redis (fills published meanwhile are lost).
        """
        self.renewals += 1
        pubsub = self._pubsub
        self._episode.failed(
            f"the pub/sub connection of fill notifications went silent (no answer to a PING "
            f"within {self.health_interval:g}s): replaced, its {len(pubsub.channels)} channels "
            "subscribed again, and their waiters re-check Redis"
        )
        async with asyncio.timeout(self._backend.command_timeout), self._sending:
            # Channels being left are not subscribed again (their UNSUBSCRIBE was lost).
            for channel in pubsub.pending_unsubscribe_channels:
                pubsub.channels.pop(channel, None)
            connection = cast("AbstractConnection | None", pubsub.connection)
            if connection is not None:
                await connection.disconnect(nowait=True)
            await pubsub.connect()  # type: ignore[no-untyped-call]  # re-subscribes all
        self._on_message(b"", b"")

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
                await self._pubsub.aclose()


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
        if isinstance(client, RedisCluster):  # (a TypeGuard would not narrow the else)
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

    async def receive(
        self, quiet_after: float
    ) -> list[bytes] | Literal["quiet", "other"] | BackendError | None:
        """
        The keys of the next invalidation (None: flush everything), ``"other"`` for another
        frame (a PONG), ``"quiet"`` when nothing came within ``quiet_after`` seconds, and
        the error (returned, not raised) for an error reply: the answer to a PING an ACL
        denies, which still proves the connection alive.

        Raises:
            BackendError: the connection failed (`BackendUnavailable`, `BackendTimeout`),
                or a frame could not be read (a corrupt reply): the connection is unusable.
        """
        try:
            message = await self._connection.read_response(timeout=quiet_after)
        except redis_errors.ResponseError as exc:
            return to_backend_error(exc)
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
