"""
The distributed rebuild lock: one process rebuilds a missing key while the others wait.

A lock is ``SET lock token NX PX lock_ttl`` with a random token (`secrets.token_hex`). Only
the owner releases or renews it (token-checked Lua). While the loader runs, a renewal task
extends the lease every ``lock_ttl / 3``. The value is written by a *fenced fill*: one script
checks the token, writes the value, deletes the lock and publishes to the key's fill channel,
so a holder whose lease ran out can never overwrite what its successor (or a ``set`` or
``delete``, which also drop the lock) wrote after it.

Acquiring is combined with reading: `ACQUIRE_OR_READ` returns the value if a fill landed since
the caller's own read, so a process that lost the race never loads a second time. What an
acquisition may take the lock over is its `Acquire` mode. An acquisition whose answer was never
read (its caller cancelled, its command timed out) may still have taken the lock:
`RebuildLock.may_hold` says so, and the caller releases it (owner-only, so harmless if not).

Guarantees:
    - At most one token owns the lock of a key at a time; only that token's fill is written.
    - A holder that dies stops renewing; its lock is free after at most ``lock_ttl``.
    - Releasing or filling after the lease was lost is a no-op reported as ``False``.

Limitations:
    - The lock lives on one Redis primary. A failover that loses the lock key (asynchronous
      replication) can let a second holder in: that costs one extra loader call, never a
      stale overwrite of a newer fill, because the new holder's token differs.
    - Renewal needs Redis: if Redis is unreachable longer than ``lock_ttl`` the lease lapses
      and the fill is refused; the loaded value is still returned to local callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .._types import LuaScript, ScriptRunner
from ..errors import BackendError
from ..keys import KeySpace
from ..record import HEADER_SIZE

__all__ = (
    "ACQUIRE_OR_READ",
    "FILL",
    "RELEASE_IF_OWNER",
    "RENEW_IF_OWNER",
    "UNANNOUNCED",
    "UNLINK_AND_RELEASE",
    "Acquire",
    "Attempt",
    "Outcome",
    "RebuildLock",
    "store",
    "unlink",
)

# KEYS[1] value key, KEYS[2] lock key
# ARGV[1] token, ARGV[2] lease in ms, ARGV[3] mode (an `Acquire` value), ARGV[4] prefix
# (mode "stale" only), ARGV[5] header size, ARGV[6] the largest value read (max_value_bytes),
# "" for no limit
# Returns {1, value} if a value is there that the mode does not override, {2, ""} if the lock
# was taken, {3, pttl, header} if another token holds it (pttl: its remaining lease in ms;
# header: the first ARGV[5] bytes of the value now stored, "" if none).
# A key of another Redis type (a hash where a record belongs), or a value past ARGV[6] (its
# length is asked first: it is neither copied into Lua nor sent), is foreign data: read as "no
# value", so the lock is taken and the fill (a SET) replaces it.
ACQUIRE_OR_READ = LuaScript(
    "acquire_or_read",
    """
local mode = ARGV[3]
local limit = tonumber(ARGV[6])
local function stored()
  local size = redis.pcall("STRLEN", KEYS[1])
  if type(size) == "table" or size == 0 or (limit and size > limit) then return false end
  return redis.call("GET", KEYS[1])
end
if mode == "absent" or mode == "stale" then
  local value = stored()
  if value and (mode == "absent" or string.sub(value, 1, #ARGV[4]) ~= ARGV[4]) then
    return {1, value}
  end
end
if mode == "claim" then
  redis.call("SET", KEYS[2], ARGV[1], "PX", ARGV[2])
  return {2, ""}
end
if redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then return {2, ""} end
local value = stored()
return {3, redis.call("PTTL", KEYS[2]), value and string.sub(value, 1, tonumber(ARGV[5])) or ""}
""",
)

# Fill messages are empty: a waiter takes a message as "look again" and reads the key, since
# anyone allowed to PUBLISH could have sent it (a record in the message would be believed).
# The record bytes are the client's, signed there when the Cache has a signing key.
#
# A script's PUBLISH is a notification, not part of the write: it runs under redis.pcall, so
# an ACL that refuses the channel (or PUBLISH) leaves the write done and reported, not failed
# half-way after it. The script then answers `UNANNOUNCED` more, and the caller says so
# (`Statistics.permission_errors`); waiters elsewhere find the value at their lease re-check.

# KEYS[1] value key, KEYS[2] lock key
# ARGV[1] token, or "" for an explicit write that supersedes whoever holds the lock;
# ARGV[2] record bytes, ARGV[3] ttl in ms, ARGV[4] fill channel
# Returns 1 if the value was written (the lock released, the fill published), 0 if the token
# no longer owns the lock and nothing was written; 1 + UNANNOUNCED if written but the PUBLISH
# was refused.
FILL = LuaScript(
    "fill",
    """
if ARGV[1] ~= "" and redis.call("GET", KEYS[2]) ~= ARGV[1] then return 0 end
redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
redis.call("DEL", KEYS[2])
local told = redis.pcall("PUBLISH", ARGV[4], "")
if type(told) == "table" and told.err then return 3 end
return 1
""",
)

# KEYS[1] lock key
# ARGV[1] token, ARGV[2] fill channel
# Returns 1 if the token owned the lock (now released; waiters told), 0 otherwise; 1 +
# UNANNOUNCED if released but the PUBLISH was refused.
RELEASE_IF_OWNER = LuaScript(
    "release_if_owner",
    """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
redis.call("DEL", KEYS[1])
local told = redis.pcall("PUBLISH", ARGV[2], "")
if type(told) == "table" and told.err then return 3 end
return 1
""",
)

# KEYS[1] lock key
# ARGV[1] token, ARGV[2] lease in ms
# Returns 1 if the lease was extended, 0 if the token no longer owns the lock.
RENEW_IF_OWNER = LuaScript(
    "renew_if_owner",
    """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call("PEXPIRE", KEYS[1], ARGV[2])
""",
)

# KEYS[1] value key, KEYS[2] lock key
# ARGV[1] fill channel
# Returns 1 if a value was removed, else 0; plus UNANNOUNCED if a lock was dropped but the
# PUBLISH telling its waiters was refused. A rebuild in progress loses its lock, so the value
# it computed from data older than this invalidation is never written.
UNLINK_AND_RELEASE = LuaScript(
    "unlink_and_release",
    """
local removed = redis.call("UNLINK", KEYS[1])
if redis.call("UNLINK", KEYS[2]) == 1 then
  local told = redis.pcall("PUBLISH", ARGV[1], "")
  if type(told) == "table" and told.err then return removed + 2 end
end
return removed
""",
)

#: Added to a script's answer when its PUBLISH was refused (see `FILL`).
UNANNOUNCED = 2


class Acquire(enum.Enum):
    """What an acquisition may take the lock over."""

    ABSENT = "absent"  # only a key without a value; else report the value
    STALE = "stale"  # also a value that still starts with a given header (nobody replaced it)
    ANY = "any"  # whatever the value (a forced refresh); still one holder at a time
    CLAIM = "claim"  # whoever holds it (Policy(lock=False)): no exclusion, but a later
    #                  set() or delete() still fences this holder's fill out


class Outcome(enum.Enum):
    VALUE = 1  # a value exists
    ACQUIRED = 2  # this token now holds the lock
    BUSY = 3  # another token holds the lock


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Outcome
    value: bytes = b""  # the stored value, when VALUE; its header, when BUSY ("" if none)
    lease_left: float = 0.0  # seconds, when BUSY


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _announced(runner: ScriptRunner, answer: Any, channel: bytes) -> int:
    """A script's answer without `UNANNOUNCED`, which is reported to the runner."""
    code = int(answer)
    if code >= UNANNOUNCED:
        runner.denied(
            f"Redis refused this user PUBLISH on {channel!r} (the write itself is done; "
            "waiters elsewhere find it at their lease re-check instead of at once)"
        )
        code -= UNANNOUNCED
    return code


async def store(runner: ScriptRunner, value_key: bytes, record: bytes, ttl: float) -> None:
    """
    An explicit write (``Cache.set``): stores ``record`` whoever holds the lock, which it
    drops, so the rebuild in progress is superseded (its fill is refused) and its waiters
    wake to read this value.
    """
    channel, lock_key = KeySpace.channel(value_key), KeySpace.lock(value_key)
    answer = await runner.eval(FILL, (value_key, lock_key), ("", record, _ms(ttl), channel))
    _announced(runner, answer, channel)


async def unlink(runner: ScriptRunner, value_key: bytes) -> bool:
    """
    An explicit delete: whether a value was removed. A rebuild in progress loses its lock, so
    a value loaded from data older than this invalidation is never written.
    """
    lock_key, channel = KeySpace.lock(value_key), KeySpace.channel(value_key)
    answer = await runner.eval(UNLINK_AND_RELEASE, (value_key, lock_key), (channel,))
    return bool(_announced(runner, answer, channel))


class RebuildLock:
    """
    The rebuild lock of one key, for one attempt (one token).

    Args:
        runner: Runs the scripts (the Cache's backend).
        value_key, lock_key, channel: The Redis names of the entry (one hash slot).
        lock_ttl: The lease, in seconds.
        max_value_bytes: A value stored past it is read as no value (left in Redis, not sent);
            None: no limit.
    """

    __slots__ = (
        "_runner",
        "channel",
        "lock_key",
        "lock_ttl",
        "lost",
        "max_value_bytes",
        "may_hold",
        "token",
        "value_key",
    )

    def __init__(
        self,
        runner: ScriptRunner,
        *,
        value_key: bytes,
        lock_key: bytes,
        channel: bytes,
        lock_ttl: float,
        max_value_bytes: int | None = None,
    ) -> None:
        self._runner = runner
        self.max_value_bytes = max_value_bytes
        self.value_key = value_key
        self.lock_key = lock_key
        self.channel = channel
        self.lock_ttl = lock_ttl
        self.token = secrets.token_hex(16)
        self.lost = False
        #: True from the moment an acquisition is sent until this token is known not to hold
        #: the lock (the answer said so, or it was filled or released). An acquisition whose
        #: answer nobody read (cancelled, timed out) may have taken it: release it then.
        self.may_hold = False

    async def acquire(self, mode: Acquire, *, replacing: bytes = b"") -> Attempt:
        """
        Take the lock as ``mode`` allows; else report the value or the holder.

        Args:
            mode: What the lock may be taken over (see `Acquire`).
            replacing: With `Acquire.STALE`, the header of the copy found expired or corrupt:
                the lock is taken over a value that still starts with it.
        """
        self.may_hold = True
        kind, payload, *rest = await self._runner.eval(
            ACQUIRE_OR_READ,
            (self.value_key, self.lock_key),
            (
                self.token,
                _ms(self.lock_ttl),
                mode.value,
                replacing,
                HEADER_SIZE,
                "" if self.max_value_bytes is None else self.max_value_bytes,
            ),
        )
        outcome = Outcome(int(kind))
        if outcome is Outcome.ACQUIRED:
            return Attempt(outcome)
        self.may_hold = False
        if outcome is Outcome.VALUE:
            return Attempt(outcome, value=bytes(payload))
        return Attempt(outcome, value=bytes(rest[0]), lease_left=max(int(payload), 1) / 1000)

    async def fill(self, record: bytes, ttl: float) -> bool:
        """Write ``record`` if this token still owns the lock, release it, wake waiters."""
        answer = await self._runner.eval(
            FILL,
            (self.value_key, self.lock_key),
            (self.token, record, _ms(ttl), self.channel),
        )
        written = _announced(self._runner, answer, self.channel)
        self.may_hold = False
        self.lost = not written
        return bool(written)

    async def release(self) -> bool:
        """Release without writing (the loader failed) and wake waiters to try again."""
        answer = await self._runner.eval(
            RELEASE_IF_OWNER, (self.lock_key,), (self.token, self.channel)
        )
        released = _announced(self._runner, answer, self.channel)
        self.may_hold = False
        return bool(released)

    async def renew(self) -> bool:
        """Extend the lease by ``lock_ttl`` if this token still owns the lock."""
        renewed = await self._runner.eval(
            RENEW_IF_OWNER, (self.lock_key,), (self.token, _ms(self.lock_ttl))
        )
        if not renewed:
            self.lost = True
        return bool(renewed)

    @contextlib.asynccontextmanager
    async def kept_alive(self) -> AsyncIterator[None]:
        """
        Renew the lease every ``lock_ttl / 3`` while the block runs.

        The renewal also stops at a flag, not only at its cancellation: redis-py sends under
        ``asyncio.wait_for``, which on Python 3.11 loses a cancellation that lands as the send
        completes (CPython gh-86296). The renewal then went on renewing, and waiting for it
        here hung the flight and every caller of the key (seen once in CI: a 60 s timeout with
        the loop waking every ``lock_ttl / 3``).
        """
        stop = asyncio.Event()
        task = asyncio.create_task(self._renew_forever(stop), name="aiocacheguard-renew")
        try:
            yield
        finally:
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _renew_forever(self, stop: asyncio.Event) -> None:
        interval = self.lock_ttl / 3
        while not self.lost:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if stop.is_set():
                return
            with contextlib.suppress(BackendError):  # try again; the lease has 2 more thirds
                await self.renew()
