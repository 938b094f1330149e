"""
The invalidation listener of the L1: Redis CLIENT TRACKING in BCAST mode, on standalone Redis
and Sentinel (Redis >= 6.0).

One dedicated connection, built from the user's ``redis.asyncio`` client's pool settings but
speaking RESP2 (``protocol=2``), runs, in this order::

    CLIENT ID                                      -> its own id
    CLIENT TRACKING ON REDIRECT <own id> BCAST PREFIX <prefix>
    SUBSCRIBE __redis__:invalidate

Redis then publishes, on that very connection, every key under the prefix that any client
changes: a write, a DEL, an expiry or an eviction gives ``[b"message", b"__redis__:invalidate",
[key, ...]]``, FLUSHDB / FLUSHALL gives the same message with ``None`` (flush everything). The
keys go to ``on_invalidate`` (``None`` for a flush).

Why tracking on the listener itself, not on the connections that read. In the default
(non-BCAST) mode the server remembers which keys a connection *read*, so tracking must be on the
reading connections. In BCAST mode it remembers nothing: every connection with BCAST tracking
for a prefix is told about every change under it, whatever it read. Measured on Redis 7.0:
three pool connections each with ``CLIENT TRACKING ON REDIRECT <listener> BCAST PREFIX x:
NOLOOP``, one of them writing ``x:1``, make the listener receive the invalidation twice (once
per tracking connection that did not write): N copies a write for N pool connections, and
NOLOOP (which only mutes a connection's own writes) stops nothing the other connections
announce. One tracking connection is enough, and putting it on the listener (``REDIRECT`` to
its own id is accepted; a RESP2 connection in subscribe mode receives the messages) leaves one
failure domain: a listener that dies takes its tracking with it, and its replacement sets both
up again. A tracking connection separate from the listener could die (or lose its redirect
target, redis/redis#11767: the server then stops sending, silently to a RESP2 client) while
the listener lives on, and nothing would tell us. NOLOOP is not used: the listener never writes.

What redis-py 8.1 allows for running CLIENT TRACKING on every pool connection, had it been
needed: a connection kwarg ``redis_connect_func`` (``redis.asyncio.Redis(...,
redis_connect_func=f)``, kept in ``pool.connection_kwargs``) *replaces* the handshake: ``f(conn)``
must call ``conn.on_connect()`` itself, then may send CLIENT TRACKING (RedisCluster uses it for
READONLY); a ``Connection`` subclass given as ``connection_class`` can override
``on_connect_check_health``; ``Connection.register_connect_callback`` runs after the handshake
but must be registered on each connection object, which the pool creates lazily. The first two
only affect connections made after they are set, so already open pool connections would need
a ``pool.disconnect()``.

The connection itself, the only part that speaks to Redis, is ``backend.TrackingConnection``
(the one module that imports ``redis``); this module decides when it is alive. A lost
connection is reported through ``on_lost``, never raised.

The RESP3 trap: redis-py 8 speaks RESP3 by default. Redirected to a RESP3 connection, Redis sends
invalidations as RESP3 *push* frames (``>2 invalidate [keys]``), not pub/sub messages; redis-py's
asyncio parser passes them to ``invalidation_push_handler_func``, which nobody sets, and
``PubSub.get_message`` returns None: they are dropped without a word (``tests/test_tracking.py``
shows it). This module pins ``protocol=2`` on its own connection, whatever the client uses.

Redis Cluster: each primary announces only the writes it executes, to clients connected to it,
so every primary needs its own tracking connection. redis-py's ``RedisCluster`` has no support
for this, but does not prevent it: ``cluster.get_primaries()`` gives nodes whose
``connection_class`` and ``connection_kwargs`` build a connection to each
(``TrackingConnection.factories``), and one `InvalidationListener` a primary (via
``connection_factory``) hears the writes of that primary's slots (``tests/test_tracking.py``
runs it on a 3-primary cluster). What redis-py does not
give is a notification when the set of primaries changes (failover, resharding): a new primary
would be untracked until the listeners were rebuilt, and invalidations for the slots it took
over would be missed. A cluster L1 therefore needs topology polling (``CLUSTER SHARDS``) that
flushes the L1 on any change; this module does not implement it.

Guarantees:
    - ``on_invalidate`` receives every key under the prefix changed by any client after
      ``on_restored`` was called, in the order Redis announced them, ``None`` for a flush.
    - A lost connection (closed, reset, killed, or silent: a PING unanswered within
      ``health_interval`` after a quiet ``health_interval``) calls ``on_lost`` once, before any
      attempt to reconnect; a restored one calls ``on_restored`` once tracking is on again.
      Between the two, invalidations may have been missed: the L1 must flush and bypass.
    - `aclose` stops the task and closes the connection; no task is left behind.

Limitations:
    - Invalidations arrive after the write that caused them, on another connection: a reader
      can serve the old value for the time they take in flight (sub-millisecond on a LAN).
    - Every write under the prefix is announced to every process, read or not: BCAST costs
      bandwidth proportional to the write rate of the whole namespace.
    - Expiry is announced when Redis expires the key (lazily on access, or by its active
      expiry cycle), which can be later than the TTL: the L1's own TTL bounds that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from .backend import INVALIDATION_CHANNEL, RedisClient, TrackingConnection
from .errors import BackendError, BackendTimeout, BackendUnavailable

__all__ = ("INVALIDATION_CHANNEL", "InvalidationListener")

logger = logging.getLogger("aiocacheguard")

_LOST = (BackendUnavailable, BackendTimeout)


class InvalidationListener:
    """
    Keeps one RESP2 connection tracking ``prefix`` (BCAST, redirected to itself) and hands
    the invalidations it receives to ``on_invalidate``; reconnects when it is lost.

    Args:
        client: The user's standalone or Sentinel client; only its pool settings are used.
        prefix: The key prefix tracked, e.g. ``b"{shop:"`` for a namespace's value keys.
        on_invalidate: Called with the keys Redis announced, or None for "flush everything".
        on_lost: Called once when the connection is found lost (before reconnecting).
        on_restored: Called each time tracking is on again, the first time included.
        health_interval: Seconds of silence after which a PING is sent, and the time the
            reply has to arrive before the connection counts as lost.
        connect_timeout: Budget of one connection attempt, handshake and tracking included.
        reconnect_delay: First and largest pause between failed attempts (doubled each time).
        connection_factory: Builds each new connection (default: ``client``'s, see
            `TrackingConnection.factories`); on a cluster, one listener a primary, each given
            that primary's.

    The callbacks run in the listener's task and must not block; an exception they raise is
    logged and the listener goes on. Its owner starts its L1 bypassed and lets it serve from
    the first ``on_restored`` on: ``on_lost`` -> `LocalStore.bypass`, ``on_restored`` ->
    `LocalStore.resume`. If Redis refuses tracking (an error reply: Redis < 6, ACLs), the
    listener logs it, sets ``error`` and stops; ``on_restored`` never comes.
    """

    def __init__(
        self,
        client: RedisClient | None,
        prefix: bytes | str,
        *,
        on_invalidate: Callable[[Sequence[bytes] | None], None],
        on_lost: Callable[[], None] = lambda: None,
        on_restored: Callable[[], None] = lambda: None,
        health_interval: float = 1.0,
        connect_timeout: float = 2.0,
        reconnect_delay: tuple[float, float] = (0.05, 1.0),
        connection_factory: Callable[[], TrackingConnection] | None = None,
    ) -> None:
        if connection_factory is None:
            if client is None:
                raise ValueError("InvalidationListener needs a client or a connection_factory")
            (connection_factory,) = TrackingConnection.factories(client)
        self._factory = connection_factory
        self.prefix = prefix.encode() if isinstance(prefix, str) else prefix
        self._on_invalidate = on_invalidate
        self._on_lost = on_lost
        self._on_restored = on_restored
        self._health_interval = health_interval
        self._connect_timeout = connect_timeout
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self._connection: TrackingConnection | None = None
        self._closing = False
        self._listening = asyncio.Event()
        #: The server's id of the listening connection, while it listens.
        self.client_id: int | None = None
        #: Why the listener gave up for good (Redis refused tracking), else None.
        self.error: BackendError | None = None
        #: Times the connection was lost / tracking was (re)established.
        self.lost = 0
        self.restored = 0

    @property
    def closing(self) -> bool:
        """Whether `aclose` was called."""
        return self._closing

    @property
    def listening(self) -> bool:
        """Whether tracking is on and invalidations are being received now."""
        return self._listening.is_set()

    def start(self) -> None:
        """Start listening in a background task (returns at once; see `wait_listening`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"aiocacheguard-tracking-{self.prefix.decode(errors='replace')}"
            )

    async def wait_listening(self) -> None:
        """Wait until tracking is on (bound it with ``asyncio.timeout``)."""
        await self._listening.wait()

    async def aclose(self) -> None:
        """
        Stop listening and close the connection. A cancellation of the caller is not swallowed.

        One ``cancel()`` is not enough on Python 3.11: redis-py sends under
        ``asyncio.wait_for``, which loses a cancellation that arrives as the send completes
        (CPython gh-86296), and the listener would go on. So the listener also checks a closing
        flag at each step, its connection is closed, and it is cancelled until it is done.
        """
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            while not task.done():
                task.cancel()
                if self._connection is not None:
                    await self._connection.close()
                await asyncio.wait({task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        self._listening.clear()

    async def __aenter__(self) -> InvalidationListener:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        delay = self._reconnect_delay[0]
        failures = 0  # connection attempts failed in a row: said once, then at debug level
        while not self._closing:
            connection = self._connection = self._factory()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    self.client_id = await connection.track(self.prefix)
            except (*_LOST, TimeoutError) as exc:
                await connection.close()
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                logger.log(level, "invalidation listener cannot connect (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_delay[1])
                continue
            except BackendError as exc:
                # Refused, not unreachable (no CLIENT TRACKING before Redis 6, an ACL that
                # forbids it): retrying would not help. The L1 stays bypassed.
                await connection.close()
                self.error = exc
                logger.error("invalidation listener refused by Redis, L1 stays off: %s", exc)
                return
            except BaseException:
                await connection.close()
                raise
            if failures > 1:
                logger.warning("invalidation listener connected after %d attempts", failures)
            delay, failures = self._reconnect_delay[0], 0
            self._listening.set()
            self.restored += 1
            self._call(self._on_restored)
            try:
                await self._listen(connection)
            except (*_LOST, TimeoutError) as exc:
                logger.warning("invalidation listener lost its connection (%s)", exc)
            finally:
                self._listening.clear()
                self.client_id = None
                await connection.close()
            if self.closing:  # aclose() ended it: not a loss
                return
            self.lost += 1
            self._call(self._on_lost)

    async def _listen(self, connection: TrackingConnection) -> None:
        ping_sent = False
        while not self._closing:
            message = await connection.receive(self._health_interval)
            if message == "quiet":  # nothing for a whole interval
                if ping_sent:
                    raise TimeoutError("the listener's PING went unanswered")
                await connection.ping()
                ping_sent = True
                continue
            ping_sent = False  # any frame proves the connection alive
            if message != "other":
                self._call(self._on_invalidate, message)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("an invalidation listener callback raised")
