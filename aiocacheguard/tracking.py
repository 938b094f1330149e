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
    - Any end of listening calls ``on_lost`` once, at once, before any attempt to listen
      again: a lost connection (closed, reset, killed, or silent: a PING unanswered within
      ``health_interval`` after a quiet ``health_interval``), an error nobody expected (a
      reply the parser cannot read, a bug), or the listener's task ending for any other
      reason (a cancellation from outside, an exception that escaped). A restored one calls
      ``on_restored`` once tracking is on again. Between the two, invalidations may have been
      missed: the L1 must flush and bypass.
    - It heals by itself: after a loss it reconnects at once; after an unexpected error, and
      while Redis cannot be reached or refuses tracking, it tries again after a pause that
      doubles up to ``reconnect_delay[1]`` (`REFUSED_RETRY` for a refusal). Said once per
      episode (`aiocacheguard._episodes.Episode`), not once per loss.
    - An error reply to the health PING (an ACL user without ``ping``: ``NOPERM``) is a reply,
      so a sign of life: the listener goes on, and says once that PING is denied.
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
from typing import Final

from ._episodes import Episode
from .backend import INVALIDATION_CHANNEL, RedisClient, TrackingConnection
from .errors import BackendError, BackendTimeout, BackendUnavailable

__all__ = ("INVALIDATION_CHANNEL", "REFUSED_RETRY", "InvalidationListener")

logger = logging.getLogger("aiocacheguard")

_LOST = (BackendUnavailable, BackendTimeout)

#: The longest pause, in seconds, between two attempts while Redis refuses tracking (an ACL
#: without ``client|tracking``, Redis < 6): the L1 comes back by itself once the refusal is
#: lifted, without asking Redis every second meanwhile.
REFUSED_RETRY: Final = 10.0


class InvalidationListener:
    """
    Keeps one RESP2 connection tracking ``prefix`` (BCAST, redirected to itself) and hands
    the invalidations it receives to ``on_invalidate``; reconnects when it is lost.

    Args:
        client: The user's standalone or Sentinel client; only its pool settings are used.
        prefix: The key prefix tracked, e.g. ``b"{shop:"`` for a namespace's value keys.
        on_invalidate: Called with the keys Redis announced, or None for "flush everything".
        on_lost: Called once when listening stops for any reason but `aclose` (before
            listening again).
        on_restored: Called each time tracking is on again, the first time included.
        health_interval: Seconds of silence after which a PING is sent, and the time the
            reply has to arrive before the connection counts as lost.
        connect_timeout: Budget of one connection attempt, handshake and tracking included.
        reconnect_delay: First and largest pause between failed attempts (doubled each time).
        connection_factory: Builds each new connection (default: ``client``'s, see
            `TrackingConnection.factories`); on a cluster, one listener a primary, each given
            that primary's.

    The callbacks run in the listener's task (or, when the task itself ended, in its done
    callback) and must not block; an exception they raise is logged and the listener goes
    on. Its owner starts its L1 bypassed and lets it serve from the first ``on_restored`` on:
    ``on_lost`` -> `LocalStore.bypass`, ``on_restored`` -> `LocalStore.resume`. If Redis
    refuses tracking (an error reply: Redis < 6, ACLs), the listener logs it, sets ``error``
    and asks again after a pause (up to `REFUSED_RETRY`); ``on_restored`` comes only once
    tracking is accepted.
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
        self._restart: asyncio.TimerHandle | None = None  # a restart after the task ended
        self._connection: TrackingConnection | None = None
        self._closing = False
        self._listening = asyncio.Event()
        # Losses, failed attempts and unexpected ends less than a minute apart: one warning.
        self._episode = Episode("invalidation listener connections")
        self._unexpected = 0  # unexpected ends in a row, for the pause before the next start
        self._ping_refused = False  # said once
        #: The server's id of the listening connection, while it listens.
        self.client_id: int | None = None
        #: Why Redis refuses tracking (asked again after a pause), else None.
        self.error: BackendError | None = None
        #: Times listening stopped (any reason but `aclose`) / tracking was (re)established.
        self.lost = 0
        self.restored = 0
        #: Times listening ended by an error nobody expected (counted in ``lost`` too).
        self.unexpected = 0

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
        if self._task is None and not self._closing:
            self._restart = None
            task = self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"aiocacheguard-tracking-{self.prefix.decode(errors='replace')}"
            )
            task.add_done_callback(self._ended)

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
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
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
        attempts = 0  # connection attempts failed in a row
        refused_delay = self._reconnect_delay[0]
        while not self._closing:
            connection = self._connection = self._factory()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    client_id = await connection.track(self.prefix)
            except (*_LOST, TimeoutError) as exc:
                await connection.close()
                attempts += 1
                self._episode.failed(f"invalidation listener cannot connect ({exc}); retrying")
                if self._episode.failures > 1:
                    logger.debug("invalidation listener cannot connect (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_delay[1])
                continue
            except BackendError as exc:
                # Refused, not unreachable (no CLIENT TRACKING before Redis 6, an ACL that
                # forbids it): asked again rarely, the L1 bypassed meanwhile.
                await connection.close()
                if self.error is None:
                    logger.error(
                        "invalidation listener refused by Redis, L1 stays off (asked again "
                        "every %.0fs at most): %s",
                        REFUSED_RETRY,
                        exc,
                    )
                self.error = exc
                await asyncio.sleep(refused_delay)
                refused_delay = min(refused_delay * 2, REFUSED_RETRY)
                continue
            except BaseException:
                await connection.close()
                raise
            if attempts > 1:
                logger.info("invalidation listener connected after %d attempts", attempts)
            delay, attempts, refused_delay = self._reconnect_delay[0], 0, self._reconnect_delay[0]
            if self.error is not None:
                logger.warning("invalidation listener accepted by Redis again: the L1 serves")
                self.error = None
            self.client_id = client_id
            self._listening.set()
            self.restored += 1
            self._episode.succeeded()
            self._call(self._on_restored)
            unexpected = False
            try:
                await self._listen(connection)
                why = ""
            except (*_LOST, TimeoutError) as exc:
                why = f"invalidation listener lost its connection ({exc})"
            except Exception as exc:
                # Nobody expected it (a reply the parser cannot read, a bug): a loss all the
                # same, and a pause before the next attempt so that it cannot spin.
                logger.debug("invalidation listener failed", exc_info=True)
                why = f"invalidation listener failed ({type(exc).__name__}: {exc})"
                unexpected = True
            finally:
                await connection.close()
            if self.closing:  # aclose() ended it: not a loss
                return
            self._lose(why, unexpected=unexpected)
            if unexpected:
                await asyncio.sleep(self._pause())

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
            ping_sent = False  # any frame proves the connection alive, an error reply too
            if isinstance(message, BackendError):
                if not self._ping_refused:
                    self._ping_refused = True
                    logger.warning(
                        "invalidation listener: Redis refuses its health PING (%s); the error "
                        "reply is taken as the sign of life. Allow PING to this user.",
                        message,
                    )
            elif message != "other":
                self._call(self._on_invalidate, message)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """
        The task ended although nobody closed the listener (an exception `_run` does not
        handle, a cancellation from outside): the L1 is bypassed at once, and the listener
        starts again after a pause.
        """
        if self._closing or task is not self._task:
            return
        self._task = None
        if task.cancelled():
            why = "was cancelled"
        elif (exc := task.exception()) is not None:
            logger.debug("invalidation listener died", exc_info=exc)
            why = f"died ({type(exc).__name__}: {exc})"
        else:
            why = "ended"
        self._lose(f"invalidation listener {why}", unexpected=True)
        self._restart = asyncio.get_running_loop().call_later(self._pause(), self.start)

    def _lose(self, why: str, *, unexpected: bool) -> None:
        """Listening stopped: ``on_lost`` at once (if it had begun), counted, said per episode."""
        if unexpected:
            self.unexpected += 1
            self._unexpected += 1
        else:
            self._unexpected = 0
        if self._listening.is_set():
            self._listening.clear()
            self.client_id = None
            self.lost += 1
            self._call(self._on_lost)
        self._episode.failed(f"{why}: the L1 serves nothing until tracking is back")

    def _pause(self) -> float:
        """Seconds before listening again after unexpected ends in a row (doubling)."""
        first, largest = self._reconnect_delay
        return min(first * 2.0 ** min(self._unexpected - 1, 30), largest)

    def _call(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("an invalidation listener callback raised")
