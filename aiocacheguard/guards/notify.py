"""
How waiters learn that a key was filled: Redis pub/sub, never polling.

Why pub/sub and not a keyed blocking signal (BLPOP on a per-key list): a list signal is consumed
by whoever pops it, so the lock holder would have to know how many processes wait; and every
blocked BLPOP holds a connection of its own. With pub/sub one connection per Cache carries every
key's signal, the holder publishes once to a per-key channel (free when nobody listens), and
each process subscribes only while its flight for that key waits.

Guarantees:
    - `FillNotifier.listen` returns only after Redis confirmed the subscription, so a fill
      published after that is delivered; a waiter that checks the key *after* entering
      `listen` cannot miss a fill between its check and its wait.
    - Subscriptions are reference counted per channel and dropped when the last listener leaves.
      A listener arriving while its channel is being unsubscribed subscribes after the
      UNSUBSCRIBE was sent, so it is never left deaf.
    - Where pub/sub cannot be had (an ACL without SUBSCRIBE, a proxy without pub/sub, a failed
      connection), `listen` still yields, with a signal that is not `Signal.live`: the waiter
      falls back to re-checking when the holder's lease can have run out. One warning per
      episode says so, and for ``RETRY_AFTER`` seconds later listeners skip the attempt.

    - A message is a wake-up, nothing more: its data is dropped here, unread, so whoever can
      PUBLISH to a fill channel (any client with that ACL right) can make listeners look
      again early, never hand them a value.

Limitations:
    - Pub/sub is at-most-once: a message published while the connection is down is lost.
      Callers must bound every wait by something they can re-check (the lock's remaining
      lease), which the Cache does; a re-subscription after a reconnect wakes every listener
      of the channel, so they re-check at once, and so does the replacement of a connection
      found silent by its health check (the backend's ``PUBSUB_HEALTH_INTERVAL``): a frozen
      connection costs waiters at most two health intervals, not the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from .._types import Subscriber
from ..errors import BackendError, CacheGuardError

__all__ = ("FillNotifier", "Signal")

logger = logging.getLogger("aiocacheguard")

#: After a subscription failed, listeners go without one for this many seconds before trying
#: again, so a pub/sub that cannot work does not cost every waiter a command budget.
RETRY_AFTER: Final = 5.0


class Signal:
    """One listener's view of a channel: set by each message, cleared by each wait."""

    __slots__ = ("_event", "live")

    def __init__(self, *, live: bool = True) -> None:
        self._event = asyncio.Event()
        #: False when no subscription stands behind this signal: it is never set.
        self.live = live

    def set(self) -> None:
        self._event.set()

    async def wait_notified(self, within: float) -> bool:
        """True if a message arrived (since the last wait) within ``within`` seconds."""
        try:
            async with asyncio.timeout(max(within, 0.0)):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class _Channel:
    __slots__ = ("ready", "signals")

    def __init__(self, ready: asyncio.Task[None]) -> None:
        self.ready = ready
        self.signals: set[Signal] = set()


class FillNotifier:
    """Multiplexes one subscriber connection over many per-key channels."""

    __slots__ = ("_channels", "_leaving", "_subscriber", "_unavailable_until", "fallbacks")

    def __init__(self) -> None:
        self._subscriber: Subscriber | None = None
        self._channels: dict[bytes, _Channel] = {}
        self._leaving: dict[bytes, asyncio.Task[None]] = {}
        self._unavailable_until: float | None = None
        #: Listeners that had to go without a subscription (see `Signal.live`).
        self.fallbacks = 0

    def bind(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def _bound(self) -> Subscriber:
        if self._subscriber is None:  # (not an assert: python -O drops those)
            raise CacheGuardError("FillNotifier: bind() a subscriber first")
        return self._subscriber

    def prepare(self) -> None:
        """Have the connection ready before the first wait (it opens in the background)."""
        if self._subscriber is not None:
            self._subscriber.prepare()

    def deliver(self, channel: bytes, data: bytes = b"") -> None:
        """
        Wake every listener of ``channel`` (called by the subscriber). ``data``, the message's
        body, is ignored: anyone may have published it (see the module's guarantees). The
        channel ``b""`` says the connection was replaced (any fill may have been missed):
        every listener of every channel is woken to re-check, and subscribing is tried
        again at once by the next listener, whatever failed before.
        """
        if not channel:
            self._unavailable_until = None
            for every in self._channels.values():
                for signal in every.signals:
                    signal.set()
            return
        entry = self._channels.get(channel)
        if entry is not None:
            for signal in entry.signals:
                signal.set()

    @contextlib.asynccontextmanager
    async def listen(self, channel: bytes) -> AsyncIterator[Signal]:
        """
        Listen to ``channel`` for the duration of the block. If no subscription can be had,
        the signal yielded is not `Signal.live` (see the module's guarantees).
        """
        subscriber = self._bound()
        loop = asyncio.get_running_loop()
        if self._unavailable_until is not None and loop.time() < self._unavailable_until:
            self.fallbacks += 1
            yield Signal(live=False)
            return
        leaving = self._leaving.get(channel)
        if leaving is not None:  # our SUBSCRIBE must follow that UNSUBSCRIBE on the wire
            await asyncio.shield(leaving)
        entry = self._channels.get(channel)
        if entry is None:
            ready = asyncio.create_task(
                subscriber.subscribe(channel), name="aiocacheguard-subscribe"
            )
            entry = self._channels[channel] = _Channel(ready)
        signal = Signal()
        entry.signals.add(signal)
        try:
            try:
                await asyncio.shield(entry.ready)
            except BackendError as exc:
                self._unavailable(exc)
                signal.live = False
            else:
                if self._unavailable_until is not None:
                    self._unavailable_until = None
                    logger.warning("pub/sub notifications work again")
            yield signal
        finally:
            entry.signals.discard(signal)
            if not entry.signals and self._channels.get(channel) is entry:
                del self._channels[channel]
                self._leave(channel, entry)

    def _unavailable(self, exc: BaseException) -> None:
        self.fallbacks += 1
        if self._unavailable_until is None:
            logger.warning(
                "pub/sub notifications are unavailable (%s): waiters re-check when the "
                "holder's lease can have run out instead of being notified",
                exc,
            )
        self._unavailable_until = asyncio.get_running_loop().time() + RETRY_AFTER

    def _leave(self, channel: bytes, entry: _Channel) -> None:
        if not entry.ready.done():
            entry.ready.cancel()
        subscriber = self._bound()

        async def unsubscribe() -> None:
            with contextlib.suppress(Exception):
                await asyncio.gather(entry.ready, return_exceptions=True)
                await subscriber.unsubscribe(channel)

        task = asyncio.create_task(unsubscribe(), name="aiocacheguard-unsubscribe")
        self._leaving[channel] = task
        task.add_done_callback(
            lambda t: self._leaving.pop(channel) if self._leaving.get(channel) is t else None
        )

    async def aclose(self) -> None:
        """Wait for the unsubscriptions still on their way (each bounded by the backend)."""
        await asyncio.gather(*self._leaving.values(), return_exceptions=True)
