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

Limitations:
    - Pub/sub is at-most-once: a message published while the connection is down is lost.
      Callers must bound every wait by something they can re-check (the lock's remaining
      lease), which the Cache does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .._types import Subscriber

__all__ = ("FillNotifier", "Signal")


class Signal:
    """
    One listener's view of a channel: set by each message, cleared by each wait; keeps the
    latest message's data for `take`.
    """

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._data = b""

    def set(self, data: bytes = b"") -> None:
        self._data = data
        self._event.set()

    def take(self) -> bytes:
        """The latest message's data (b"" if none or empty), forgotten once taken."""
        data, self._data = self._data, b""
        return data

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

    __slots__ = ("_channels", "_subscriber")

    def __init__(self) -> None:
        self._subscriber: Subscriber | None = None
        self._channels: dict[bytes, _Channel] = {}

    def bind(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def prepare(self) -> None:
        """Have the connection ready before the first wait (it opens in the background)."""
        if self._subscriber is not None:
            self._subscriber.prepare()

    def deliver(self, channel: bytes, data: bytes = b"") -> None:
        """Wake every listener of ``channel`` with ``data`` (called by the subscriber)."""
        entry = self._channels.get(channel)
        if entry is not None:
            for signal in entry.signals:
                signal.set(data)

    @contextlib.asynccontextmanager
    async def listen(self, channel: bytes) -> AsyncIterator[Signal]:
        """
        Listen to ``channel`` for the duration of the block.

        Raises:
            BackendError: the subscription could not be made.
        """
        subscriber = self._subscriber
        assert subscriber is not None, "bind() a subscriber first"
        entry = self._channels.get(channel)
        if entry is None:
            ready = asyncio.create_task(
                subscriber.subscribe(channel), name="aiocacheguard-subscribe"
            )
            entry = self._channels[channel] = _Channel(ready)
        signal = Signal()
        entry.signals.add(signal)
        try:
            await asyncio.shield(entry.ready)
            yield signal
        finally:
            entry.signals.discard(signal)
            if not entry.signals and self._channels.get(channel) is entry:
                del self._channels[channel]
                if not entry.ready.done():
                    entry.ready.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.gather(entry.ready, return_exceptions=True)
                    await subscriber.unsubscribe(channel)
