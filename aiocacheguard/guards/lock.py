"""
The distributed rebuild lock: one process rebuilds a missing key while the others wait.

A lock is ``SET lock token NX PX lock_ttl`` with a random token (`secrets.token_hex`). Only
the owner releases or renews it (token-checked Lua). While the loader runs, a renewal task
extends the lease every ``lock_ttl / 3``. The value is written by a *fenced fill*: one script
checks the token, writes the value, deletes the lock and publishes to the key's fill channel,
so a holder whose lease ran out can never overwrite what its successor (or a ``set`` or
``delete``, which also drop the lock) wrote after it.

Acquiring is combined with reading: `ACQUIRE_OR_READ` returns the value if a fill landed since
the caller's own read, so a process that lost the race never loads a second time.

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

from .._types import LuaScript, ScriptRunner
from ..errors import BackendError

__all__ = (
    "ACQUIRE_OR_READ",
    "FENCED_FILL",
    "INLINE_LIMIT",
    "RELEASE_IF_OWNER",
    "RENEW_IF_OWNER",
    "STORE_AND_RELEASE",
    "UNLINK_AND_RELEASE",
    "Outcome",
    "RebuildLock",
)

# KEYS[1] value key, KEYS[2] lock key
# ARGV[1] token, ARGV[2] lease in ms, ARGV[3] mode, ARGV[4] prefix (mode "stale" only)
#   mode "absent": take the lock only if the key holds no value;
#   mode "stale":  take it also if the value still starts with ARGV[4] (the header of the
#                  copy the caller found expired or corrupt), i.e. nobody replaced it since;
#   mode "any":    take it whatever the value.
# Returns {1, value} if a value is there that the mode does not override, {2, ""} if the lock
# was taken, {3, pttl} if another token holds it (pttl: its remaining lease in ms).
ACQUIRE_OR_READ = LuaScript(
    "acquire_or_read",
    """
local mode = ARGV[3]
if mode ~= "any" then
  local value = redis.call("GET", KEYS[1])
  if value and (mode == "absent" or string.sub(value, 1, #ARGV[4]) ~= ARGV[4]) then
    return {1, value}
  end
end
if redis.call("SET", KEYS[2], ARGV[1], "NX", "PX", ARGV[2]) then return {2, ""} end
return {3, redis.call("PTTL", KEYS[2])}
""",
)

# Fill messages carry the record itself when it is at most ARGV's inline limit, so waiters
# need no read of their own; larger records (and releases) publish "" and waiters read the key.

# KEYS[1] value key, KEYS[2] lock key
# ARGV[1] token, ARGV[2] record bytes, ARGV[3] ttl in ms, ARGV[4] fill channel,
# ARGV[5] inline limit in bytes
# Returns 1 if the value was written (and the lock released, the fill published), 0 if the
# token no longer owns the lock and nothing was written.
FENCED_FILL = LuaScript(
    "fenced_fill",
    """
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return 0 end
redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
redis.call("DEL", KEYS[2])
redis.call("PUBLISH", ARGV[4], #ARGV[2] <= tonumber(ARGV[5]) and ARGV[2] or "")
return 1
""",
)

# KEYS[1] lock key
# ARGV[1] token, ARGV[2] fill channel
# Returns 1 if the token owned the lock (now released; waiters told), 0 otherwise.
RELEASE_IF_OWNER = LuaScript(
    "release_if_owner",
    """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
redis.call("DEL", KEYS[1])
redis.call("PUBLISH", ARGV[2], "")
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
# ARGV[1] record bytes, ARGV[2] ttl in ms, ARGV[3] fill channel, ARGV[4] inline limit
# Returns 1. An explicit write supersedes any rebuild in progress: the holder's fill will be
# refused, and waiters wake to read this value.
STORE_AND_RELEASE = LuaScript(
    "store_and_release",
    """
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
redis.call("DEL", KEYS[2])
redis.call("PUBLISH", ARGV[3], #ARGV[1] <= tonumber(ARGV[4]) and ARGV[1] or "")
return 1
""",
)

# KEYS[1] value key, KEYS[2] lock key
# ARGV[1] fill channel
# Returns 1 if a value was removed, else 0. A rebuild in progress loses its lock, so the value
# it computed from data older than this invalidation is never written.
UNLINK_AND_RELEASE = LuaScript(
    "unlink_and_release",
    """
local removed = redis.call("UNLINK", KEYS[1])
if redis.call("UNLINK", KEYS[2]) == 1 then redis.call("PUBLISH", ARGV[1], "") end
return removed
""",
)


class Outcome(enum.Enum):
    VALUE = 1  # a value exists
    ACQUIRED = 2  # this token now holds the lock
    BUSY = 3  # another token holds the lock


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Outcome
    value: bytes = b""
    lease_left: float = 0.0  # seconds, when BUSY


#: Records up to this size travel in the fill message itself. Redis disconnects a subscriber
#: whose output buffer passes 8 MiB for a minute (client-output-buffer-limit pubsub), so big
#: values are read by the waiters instead.
INLINE_LIMIT = 64 * 1024


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RebuildLock:
    """
    The rebuild lock of one key, for one attempt (one token).

    Args:
        runner: Runs the scripts (the Cache's backend).
        value_key, lock_key, channel: The Redis names of the entry (one hash slot).
        lock_ttl: The lease, in seconds.
    """

    __slots__ = ("_runner", "channel", "lock_key", "lock_ttl", "lost", "token", "value_key")

    def __init__(
        self,
        runner: ScriptRunner,
        *,
        value_key: bytes,
        lock_key: bytes,
        channel: bytes,
        lock_ttl: float,
    ) -> None:
        self._runner = runner
        self.value_key = value_key
        self.lock_key = lock_key
        self.channel = channel
        self.lock_ttl = lock_ttl
        self.token = secrets.token_hex(16)
        self.lost = False

    async def acquire_or_read(
        self, *, replacing: bytes | None = None, force: bool = False
    ) -> Attempt:
        """
        Take the lock unless the key holds a value; else report the value or the holder.

        Args:
            replacing: Also take the lock over a value that still starts with these bytes
                (the header of a copy found expired or corrupt), unless it was replaced.
            force: Take the lock whatever the value.
        """
        if force:
            mode, prefix = "any", b""
        elif replacing is not None:
            mode, prefix = "stale", replacing
        else:
            mode, prefix = "absent", b""
        kind, payload = await self._runner.eval(
            ACQUIRE_OR_READ,
            (self.value_key, self.lock_key),
            (self.token, _ms(self.lock_ttl), mode, prefix),
        )
        outcome = Outcome(int(kind))
        if outcome is Outcome.VALUE:
            return Attempt(outcome, value=bytes(payload))
        if outcome is Outcome.BUSY:
            return Attempt(outcome, lease_left=max(int(payload), 1) / 1000)
        return Attempt(outcome)

    async def fill(self, record: bytes, ttl: float) -> bool:
        """Write ``record`` if this token still owns the lock, release it, wake waiters."""
        written = await self._runner.eval(
            FENCED_FILL,
            (self.value_key, self.lock_key),
            (self.token, record, _ms(ttl), self.channel, INLINE_LIMIT),
        )
        self.lost = not written
        return bool(written)

    async def release(self) -> bool:
        """Release without writing (the loader failed) and wake waiters to try again."""
        released = await self._runner.eval(
            RELEASE_IF_OWNER, (self.lock_key,), (self.token, self.channel)
        )
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
        """Renew the lease every ``lock_ttl / 3`` while the block runs."""
        task = asyncio.create_task(self._renew_forever(), name="aiocacheguard-renew")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _renew_forever(self) -> None:
        interval = self.lock_ttl / 3
        while not self.lost:
            await asyncio.sleep(interval)
            with contextlib.suppress(BackendError):  # try again; the lease has 2 more thirds
                await self.renew()
