"""
The cross-process miss protocol: take the rebuild lock and load, or wait for the fill.

One `Rebuilder` per Cache runs every miss (`Rebuilder.load`) and every refresh
(`Rebuilder.refresh`) through the same steps:

1. **Acquire** (one script): the lock is taken unless a usable value is there, which is
   returned instead (a fill landed since our read). What the lock may be taken over is the
   `Acquire` mode: nothing (a miss), a copy found expired (a refresh; unless someone replaced
   it meanwhile), anything (a forced refresh), or, with ``Policy(lock=False)``, whoever holds
   it (no exclusion, but a later set() or delete() still fences the fill out).
2. **Wait** (the lock is busy): subscribe to the key's fill channel, re-check, and sleep until
   a fill is announced or the holder's lease can have run out, then re-check (one read per
   process: the single-flight has already made one waiter of all its callers); a lease that
   ran out is taken over. Without pub/sub the wait is the lease-bounded re-check alone.
3. **Load as holder**: run the loader with the lease renewed, encode, and write with the fenced
   fill (written only while our token holds the lock), which also wakes the waiters.

Guarantees:
    - Whatever fails after the lock may have been taken (the loader, encoding, a Redis error,
      cancellation) releases it: at once where the error is ordinary, in the background where
      the caller was cancelled (an acquisition whose answer nobody read is undone once the
      answer arrives). `Rebuilder.aclose` waits for those releases.
    - A waiter never returns empty-handed: it gets the fill, takes the lock over, or, after
      ``wait_timeout``, loads itself (or raises `LockTimeout` if the policy says so).
    - A forced refresh that finds another holder waits for that holder's fill and returns
      it; it does not return the value it meant to replace.
    - A value returned is a record read from Redis (checked by the codec, signature and all),
      never a pub/sub message: a fill message is only a wake-up, so whoever can PUBLISH to a
      fill channel can make waiters re-check early, never hand them a value.
    - A forced refresh returns only a value that is in Redis: one that could not be written
      (Redis failed, the holder it waited for never filled, the value is too large) raises,
      as ``Cache.set`` does, rather than return a value that later reads would not see.

Limitations:
    - An acquisition that timed out may land after the release sent for it; the lock's lease
      (``lock_ttl``) bounds how long that lock stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from ._types import ScriptRunner
from .codec import Entry, RecordCodec
from .errors import BackendError, ConfigurationError, LockTimeout, ValueTooLargeError
from .guards.lock import Acquire, Attempt, Outcome, RebuildLock, store
from .guards.notify import FillNotifier
from .keys import KeySpace
from .loading import LoaderRunner
from .policy import Policy
from .record import header_of

__all__ = ("Rebuilder",)

T = TypeVar("T")

#: Added to a holder's remaining lease before a waiter re-checks for a takeover, so the
#: re-check lands just after the lock expired rather than just before.
LEASE_SLACK: Final = 0.01

Loader = Callable[[], Awaitable[Any]]


#: Called beside each fill with the key and value written (the Cache adds it to its Bloom
#: filter). Must not raise.
OnFill = Callable[[bytes, Any], Awaitable[None]]


class Rebuilder:
    """
    The miss protocol of one Cache.

    Args:
        runner: Runs the lock's scripts (the Cache's backend).
        notifier: Fill notifications.
        codec: Encodes the loaded value; decodes (and checks) what Redis holds.
        run_loader: Calls a loader (budget, bulkhead); its statistics and event hook are the
            protocol's too (``takeover``, ``lock_lost``).
    """

    def __init__(
        self,
        runner: ScriptRunner,
        notifier: FillNotifier,
        codec: RecordCodec,
        run_loader: LoaderRunner,
    ) -> None:
        self._runner = runner
        self._notifier = notifier
        self.codec = self._codec = codec
        self.counters = self._counters = run_loader.counters
        self.emit = self._emit = run_loader.emit
        self._run_loader = run_loader
        self._releases: set[asyncio.Task[Any]] = set()

    async def load(
        self,
        rkey: bytes,
        loader: Loader,
        policy: Policy,
        *,
        expired: Entry | None,
        on_fill: OnFill | None = None,
        returns: object = None,
    ) -> Any:
        """
        A miss: the value some process loads (this one if it gets the lock). ``expired`` is a
        copy past its TTL that the lock may be taken over, unless it was replaced.

        If Redis fails on the way, the value is loaded without it (counted in
        ``unwritten_loads``).

        Raises:
            LockTimeout: waiting ran out and ``policy.on_wait_timeout == "raise"``.
            Exception: whatever the loader raised.
        """
        mode = Acquire.STALE if expired is not None else Acquire.ABSENT
        replacing = b"" if expired is None else expired.header
        value, _ = await self._rebuild(
            rkey, loader, policy, mode, replacing, on_fill, wait=True, returns=returns
        )
        return value

    async def refresh(
        self,
        rkey: bytes,
        loader: Loader,
        policy: Policy,
        *,
        replacing: Entry | None,
        on_fill: OnFill | None = None,
        returns: object = None,
    ) -> tuple[Any, bool]:
        """
        Load again and write, returning the value now cached and whether this call loaded it:
        unless the copy ``replacing``
        was already replaced (that value is returned) or, in the background case
        (``replacing`` given), another process is refreshing it (``replacing`` is returned).
        With ``replacing=None`` (a forced refresh), a refresh by another process is waited for.

        Raises:
            BackendError: a forced refresh could not write (Redis failed or did not answer).
            LockTimeout: a forced refresh waited ``wait_timeout`` for another process's fill.
            ValueTooLargeError: a forced refresh's value is past ``max_value_bytes``.
            Exception: whatever the loader raised.
        """
        if replacing is None:
            return await self._rebuild(
                rkey,
                loader,
                policy,
                Acquire.ANY,
                b"",
                on_fill,
                wait=True,
                returns=returns,
                forced=True,
            )
        value, loaded = await self._rebuild(
            rkey,
            loader,
            policy,
            Acquire.STALE,
            replacing.header,
            on_fill,
            wait=False,
            returns=returns,
        )
        return (replacing.result(returns), False) if value is _BUSY else (value, loaded)

    def encode(self, rkey: bytes, value: Any, policy: Policy) -> tuple[bytes, float]:
        """
        An explicit write's (``Cache.set``) record for ``rkey`` and its TTL, with no I/O;
        `store` writes it.

        Raises:
            SerializationError: the value cannot be encoded, or its record is larger than
                the codec's limit (`ValueTooLargeError`).
        """
        encoded = self._codec.encode(value, policy, compute_time=0.0, rkey=rkey)
        if encoded is None:  # the codec stores None only under a negative_ttl
            raise ConfigurationError(
                "negative_ttl",
                None,
                "a number of seconds for an explicit write of None "
                "(the Cache writes with Policy.for_write, which sets one)",
            )
        return encoded

    async def store(
        self,
        rkey: bytes,
        value: Any,
        encoded: tuple[bytes, float],
        *,
        on_fill: OnFill | None = None,
    ) -> None:
        """
        Store what `encode` made of ``value``, whoever holds the lock, so the rebuild in
        progress anywhere is superseded (its fill refused) and its waiters read this value.

        Raises:
            BackendError: Redis failed.
        """
        written = store(self._runner, rkey, *encoded)
        if on_fill is not None and value is not None:
            await asyncio.gather(written, on_fill(rkey, value))  # as a fill does
        else:
            await written

    async def _rebuild(
        self,
        rkey: bytes,
        loader: Loader,
        policy: Policy,
        mode: Acquire,
        replacing: bytes,
        on_fill: OnFill | None,
        *,
        wait: bool,
        returns: object = None,
        forced: bool = False,
    ) -> tuple[Any, bool]:
        """
        The value, and whether this call loaded and wrote it (as the lock's holder). A
        ``forced`` rebuild (`refresh`) raises where the value could not be written.
        """
        lock = RebuildLock(
            self._runner,
            value_key=rkey,
            lock_key=KeySpace.lock(rkey),
            channel=KeySpace.channel(rkey),
            lock_ttl=policy.lock_ttl,
            max_value_bytes=self._codec.max_value_bytes,
        )
        if not policy.lock:
            mode = Acquire.CLAIM
        self._notifier.prepare()  # if this must wait, its connection is on the way
        try:
            try:
                attempt, entry = await self._acquire(lock, mode, replacing, returns)
                if attempt.outcome is Outcome.BUSY:
                    if not wait:
                        return _BUSY, False
                    self._counters.lock_waits += 1
                    # A forced refresh waits for a value other than the one it found.
                    after = attempt.value if mode is Acquire.ANY else replacing
                    attempt, entry = await self._wait_for_fill(lock, policy, after, returns)
            except BackendError:
                if not wait:
                    raise  # a background refresh that could not write anyway: give up
                # Redis failed mid-way: load without it (the flight still guards the loader
                # in this process). The loader's own errors are not caught here: a loader
                # raising a BackendError of its own is not taken for Redis failing.
                if lock.may_hold:
                    self._release_later(lock)
                if forced:
                    raise  # it could not write: say so, as set() does (reads keep the old)
                self._counters.unwritten_loads += 1
                return await self._run_loader(rkey, loader, policy), False
            if entry is not None:
                return entry.result(returns), False
            if attempt.outcome is Outcome.ACQUIRED:
                return await self._load_as_holder(lock, loader, policy, on_fill, forced), True
            if forced:
                raise LockTimeout(
                    f"a forced refresh waited wait_timeout={policy.wait_timeout}s for another "
                    "process's refresh of the key, which holds its rebuild lock, to fill it; "
                    "nothing was written"
                )
            if policy.on_wait_timeout == "raise":
                raise LockTimeout(
                    f"waited wait_timeout={policy.wait_timeout}s for another process to fill "
                    "the key; raise Policy.wait_timeout, or use on_wait_timeout='load'"
                )
            return await self._run_loader(rkey, loader, policy), False
        except asyncio.CancelledError:
            if lock.may_hold:
                self._release_later(lock)
            raise
        except BaseException:
            if lock.may_hold:
                with contextlib.suppress(BackendError):
                    await lock.release()  # wake the waiters now rather than after the lease
            raise

    async def _acquire(
        self, lock: RebuildLock, mode: Acquire, replacing: bytes, returns: object
    ) -> tuple[Attempt, Entry | None]:
        """
        One lock attempt. A value found instead is returned decoded if it is usable: not
        corrupt and not expired (else the lock is taken over it, unless it was replaced).
        """
        for _ in range(3):  # a value that keeps being replaced by unusable ones: give up
            attempt = await self._acquire_once(lock, mode, replacing)
            if attempt.outcome is not Outcome.VALUE:
                return attempt, None
            entry = self._codec.decode(attempt.value, lock.value_key)
            if entry is not None and entry.fresh(self._codec.clock()) and entry.usable(returns):
                return attempt, entry
            mode, replacing = Acquire.STALE, header_of(attempt.value)  # take the lock over it
        return attempt, None

    async def _acquire_once(self, lock: RebuildLock, mode: Acquire, replacing: bytes) -> Attempt:
        # The acquisition runs in a task of its own, so that if this caller is cancelled while
        # it is on the wire, its answer is still read: a lock it took is then released.
        task = asyncio.create_task(
            lock.acquire(mode, replacing=replacing), name="aiocacheguard-acquire"
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._releases.add(task)
            task.add_done_callback(lambda t: self._undo(lock, t))
            lock.may_hold = False  # the undo owns the release now
            raise

    def _undo(self, lock: RebuildLock, task: asyncio.Task[Attempt]) -> None:
        self._releases.discard(task)
        if (
            task.cancelled()
            or task.exception() is not None  # the outcome is unknown: release to be sure
            or task.result().outcome is Outcome.ACQUIRED
        ):
            self._release_later(lock)

    def _release_later(self, lock: RebuildLock) -> None:
        async def release() -> None:
            with contextlib.suppress(BackendError):
                await lock.release()

        task = asyncio.create_task(release(), name="aiocacheguard-release")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _wait_for_fill(
        self, lock: RebuildLock, policy: Policy, replacing: bytes, returns: object
    ) -> tuple[Attempt, Entry | None]:
        """
        Wait for another process's fill (a value other than ``replacing``), re-checking on
        every notification and whenever the holder's lease may have run out (then the lock
        is taken over).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.wait_timeout
        mode = Acquire.STALE if replacing else Acquire.ABSENT
        async with self._notifier.listen(lock.channel) as signal:
            notified = True  # the first check, right after subscribing, is not a takeover
            while True:
                attempt, entry = await self._acquire(lock, mode, replacing, returns)
                if entry is not None:
                    return attempt, entry
                if attempt.outcome is Outcome.ACQUIRED:
                    if not notified:
                        self._counters.takeovers += 1
                        self._emit("takeover", lock.value_key)
                    return attempt, None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return attempt, None
                # Woken by a message (a fill, a release, or anyone's PUBLISH: it only says
                # "look again") or by the lease running out; either way, Redis decides.
                notified = await signal.wait_notified(
                    min(remaining, attempt.lease_left + LEASE_SLACK)
                )

    async def _load_as_holder(
        self,
        lock: RebuildLock,
        loader: Loader,
        policy: Policy,
        on_fill: OnFill | None,
        forced: bool = False,
    ) -> Any:
        """
        Load, write with the fenced fill, return the value. A value that is not written (Redis
        failed, or it is too large) is still returned, unless ``forced``: then it raises.
        """
        self._counters.lock_acquired += 1
        started = time.monotonic()
        async with lock.kept_alive():
            value = await self._run_loader(lock.value_key, loader, policy)
        try:
            written = self._codec.encode(
                value, policy, compute_time=time.monotonic() - started, rkey=lock.value_key
            )
        except ValueTooLargeError as exc:  # served to the callers, but not cached
            if forced:
                await self._let_go(lock)
                raise  # (counted) as set() refuses it
            self._codec.not_cached(lock.value_key, exc)
            written = None
        if written is None:  # not cached (a None, or too large): let go of the lock
            await self._let_go(lock)
            return value
        try:
            if on_fill is not None and value is not None:
                # Side by side, and both awaited whatever happens (no orphan Bloom add).
                filled, _ = await _both(lock.fill(*written), on_fill(lock.value_key, value))
            else:
                filled = await lock.fill(*written)
        except BackendError:
            if lock.may_hold:  # the fill may not have landed: don't leave the lock standing
                self._release_later(lock)
            if forced:
                raise  # it may not have been written: say so, as set() does
            return value  # counted; the value is still served to this process's callers
        if not filled:
            self._counters.lock_lost += 1
            self._emit("lock_lost", lock.value_key)
        return value

    async def _let_go(self, lock: RebuildLock) -> None:
        """Release the lock now, or in the background if Redis fails."""
        try:
            await lock.release()
        except BackendError:
            self._release_later(lock)

    async def aclose(self) -> None:
        """Wait for the releases still on their way (each bounded by a command budget)."""
        while self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)


async def _both(first: Awaitable[T], second: Awaitable[Any]) -> tuple[T, Any]:
    """Await both side by side; the first's error, if any, once both are done."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results[0], results[1]  # type: ignore[return-value]


class _Busy:
    """Another process holds the lock and the caller chose not to wait."""


_BUSY: Final = _Busy()
