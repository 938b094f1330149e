"""
Refreshing entries: when a read asks for a background refresh (logical expiry, XFetch), running
it and forced refreshes through the rebuild protocol, and what a failed one says.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ._checks import check_int
from ._episodes import Episode
from .codec import Entry
from .guards.refresh import Refresher, xfetch_due
from .metrics import Counters, Emitter
from .policy import Policy
from .rebuild import OnFill, Rebuilder

__all__ = ("Refreshes",)

Loader = Callable[[], Awaitable[Any]]


class Refreshes:
    """
    The refreshes of one Cache, owned by a `Refresher` (one per key, bounded, drained on
    close, backed off after a failure).

    Args:
        rebuilder: Runs each refresh (lock, load, fenced fill); its statistics, events and
            random draws (XFetch) are the refreshes' too.
        clock: Times the backoff after a failed refresh.
        max_concurrent: Background refreshes at once.
        written: Called with the key after a refresh, so later reads see the new value.
        on_fill: Called beside each fill (the Bloom filter's add).
    """

    def __init__(
        self,
        rebuilder: Rebuilder,
        clock: Callable[[], float],
        max_concurrent: int,
        written: Callable[[bytes], None],
        on_fill: OnFill | None,
    ) -> None:
        check_int("max_refreshes", max_concurrent, minimum=1)
        self._rebuilder = rebuilder
        self._counters: Counters = rebuilder.counters
        self._emit: Emitter = rebuilder.emit
        self._rng: random.Random = rebuilder.codec.rng
        self._refresher: Refresher[bytes] = Refresher(max_concurrent=max_concurrent, clock=clock)
        # Forced refreshes apart: one must not join a background refresh, which gives up
        # (returning the stale value it meant to replace) when another process is refreshing.
        self._forced: Refresher[bytes] = Refresher(max_concurrent=max_concurrent, clock=clock)
        self._written = written
        self._on_fill = on_fill
        # Cache-wide: refreshes of other keys succeeding in between do not start a new one.
        self._episode = Episode("background refreshes", clock=clock)

    def maybe_start(
        self, rkey: bytes, entry: Entry, loader: Loader, policy: Policy, now: float
    ) -> None:
        """Start a background refresh if the entry is soft-expired or XFetch draws one."""
        record = entry.record
        if record.negative:
            return
        soft = record.soft_expires_at
        if soft is not None and now >= soft:
            early = False
        elif policy.early_beta > 0 and xfetch_due(
            now=now,
            expiry=record.expires_at if soft is None else soft,
            delta=record.compute_time,
            beta=policy.early_beta,
            rng=self._rng,
        ):
            early = True
        else:
            return
        if self._refresher.schedule(rkey, self._in_background(rkey, loader, policy, entry)):
            self._counters.early_refreshes += early

    async def run(self, rkey: bytes, loader: Loader, policy: Policy, returns: object = None) -> Any:
        """Refresh now whatever is cached, joining a refresh of the key already running."""
        return await self._forced.run(
            rkey, lambda: self._refresh(rkey, loader, policy, None, returns)
        )

    def _in_background(
        self, rkey: bytes, loader: Loader, policy: Policy, seen: Entry
    ) -> Callable[[], Coroutine[Any, Any, Any]]:
        async def work() -> Any:
            try:
                value = await self._refresh(rkey, loader, policy, seen)
            except Exception as exc:
                # Never raised into a caller: the stale value stays served. Said once per
                # episode of failures (then summed up each minute); each is still counted
                # and an event.
                self._counters.refresh_errors += 1
                self._episode.failed(f"background refresh of {rkey!r} failed: {exc!r}")
                self._emit("refresh_failed", rkey, exc)
                raise
            self._episode.succeeded()
            return value

        return work

    async def _refresh(
        self,
        rkey: bytes,
        loader: Loader,
        policy: Policy,
        seen: Entry | None,
        returns: object = None,
    ) -> Any:
        value, loaded = await self._rebuilder.refresh(
            rkey, loader, policy, replacing=seen, on_fill=self._on_fill, returns=returns
        )
        if loaded:  # this call loaded and wrote it
            self._counters.refreshes += 1
            self._emit("refreshed", rkey)
        self._written(rkey)
        return value

    def forget(self, rkey: bytes) -> None:
        """After a write: a refresh asked for later must not join one begun before it."""
        self._refresher.forget(rkey)
        self._forced.forget(rkey)

    async def aclose(self, *, drain: bool) -> None:
        await self._refresher.aclose(drain=drain)
        await self._forced.aclose(drain=drain)
