"""
A Bloom filter in a Redis bitmap: "definitely absent" answers for keys that exist nowhere.

Sized from the expected number of items ``n`` (``capacity``) and the false-positive rate ``p``
(``error_rate``): ``m = ceil(-n ln p / (ln 2)^2)`` bits and ``k = round(m / n * ln 2)`` hash
functions. Positions come from one 128-bit mmh3 hash split into two 64-bit halves, combined by
Kirsch-Mitzenmacher double hashing: ``(h1 + i * h2) mod m`` for ``i`` in ``0..k-1``.

Each ``contains``, ``contains_many`` and ``add`` is one Lua script call (one round trip, and
pipelined with other calls of the same event-loop turn). The bitmap and its rebuild copy share
one hash tag, ``{namespace:name}``, so the whole filter lives on one Redis Cluster slot.

`BloomFilter.rebuild` fills a fresh bitmap next to the live one and swaps it in with RENAME,
which is atomic: readers see the old filter or the new one, never a half-built one. Items added
while a rebuild runs are written to both bitmaps, so the swap loses none of them.

Guarantees:
    - No false negatives for items added (through `add`, `add_many`, a rebuild, or a Cache
      fill) to the live bitmap, including during and after a rebuild.
    - A missing bitmap (deleted, evicted, FLUSHALL, a failover that lost it) reads as "maybe
      present": the filter fails open, and the Cache asks the loader.
    - An `add` that Redis refused (an error, a timeout) is not forgotten: this filter object
      keeps the items (at most `MAX_PENDING`), answers "maybe" for them, and sends them with
      its next `add` until one succeeds.

Limitations:
    - Items cannot be removed; rebuild from the source of truth to drop deleted ones.
    - Past ``capacity`` items the false-positive rate grows above ``error_rate``.
    - The bitmap is at most 2^32 bits (512 MiB), a limit of Redis' SETBIT.
    - Items whose add failed are known only to the process that tried: until its next
      successful add, other processes may answer "absent" for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import struct
from collections.abc import AsyncIterable, Iterable, Sequence

import mmh3

from .._aio import aiter_of
from .._checks import check_int, check_number
from .._types import Key, LuaScript, ScriptRunner
from ..errors import BackendError, ConfigurationError
from ..keys import KeySpace, hash_tag

__all__ = ("ADD", "CONTAINS", "BloomFilter")

#: Redis bitmaps address at most 2^32 bits.
MAX_BITS = 2**32
#: Items whose add failed, kept in memory until an add succeeds. Past this many, the filter
#: answers "maybe" for everything until then (fail open rather than answer wrongly).
MAX_PENDING = 10_000

# Bit positions travel packed, 4 bytes each (big-endian unsigned), one string per call:
# encoding hundreds of thousands of integer arguments would cost far more than the script.

# KEYS[1] live bitmap, KEYS[2] rebuild bitmap (may not exist)
# ARGV[1] packed bit positions
# Returns the number of positions. Bits are set in the live bitmap, and in the rebuild bitmap
# too while a rebuild is running, so the swap loses nothing added meanwhile.
ADD = LuaScript(
    "bloom_add",
    """
local building = redis.call("EXISTS", KEYS[2]) == 1
local packed = ARGV[1]
for i = 1, #packed, 4 do
  local position = struct.unpack(">I4", packed, i)
  redis.call("SETBIT", KEYS[1], position, 1)
  if building then redis.call("SETBIT", KEYS[2], position, 1) end
end
return #packed / 4
""",
)

# KEYS[1] bitmap
# ARGV[1] k (positions per item), ARGV[2] packed positions, k per item in turn
# Returns one integer per item: 1 maybe present, 0 definitely absent, -1 the bitmap is missing.
CONTAINS = LuaScript(
    "bloom_contains",
    """
local k = tonumber(ARGV[1])
local packed = ARGV[2]
local items = #packed / (4 * k)
local answers = {}
if redis.call("EXISTS", KEYS[1]) == 0 then
  for item = 1, items do answers[item] = -1 end
  return answers
end
for item = 1, items do
  local present = 1
  local first = (item - 1) * k * 4 + 1
  for i = first, first + (k - 1) * 4, 4 do
    if redis.call("GETBIT", KEYS[1], (struct.unpack(">I4", packed, i))) == 0 then
      present = 0
      break
    end
  end
  answers[item] = present
end
return answers
""",
)

# KEYS[1] rebuild bitmap
# ARGV[1] the last bit offset (m - 1)
# Returns 1. Starts a rebuild: an all-zero bitmap of the full size.
START_REBUILD = LuaScript(
    "bloom_start_rebuild",
    """
redis.call("DEL", KEYS[1])
redis.call("SETBIT", KEYS[1], ARGV[1], 0)
return 1
""",
)

# KEYS[1] rebuild bitmap, KEYS[2] live bitmap
# Returns 1. Swaps the rebuilt bitmap in, atomically.
FINISH_REBUILD = LuaScript(
    "bloom_finish_rebuild",
    """
redis.call("RENAME", KEYS[1], KEYS[2])
return 1
""",
)

_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,64}")


def _as_bytes(item: Key) -> bytes:
    return item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item


class BloomFilter:
    """
    A Redis-backed Bloom filter of cache keys.

    Create it, hand it to a Cache (``Cache(..., bloom=f)`` guards every miss of that Cache),
    and fill it from the source of
    truth with `add_many` or `rebuild`. The first Cache it is given binds it to its Redis
    client and namespace. A key the filter says is definitely absent returns the negative
    result (``None``) without calling the loader; every value a Cache writes adds its key.

    Args:
        name: Names the filter within the Cache's namespace.
        capacity: Items the filter is sized for, 1 to 10^10.
        error_rate: Acceptable false-positive rate, in (0, 0.5).

    Raises:
        ConfigurationError: an argument is out of range, or the filter would need more than
            2^32 bits.

    Example:
        >>> f = BloomFilter("users", capacity=1_000_000, error_rate=0.001)
        >>> f.bits, f.hashes
        (14377588, 10)
        >>> len(f.positions("user:42")) == f.hashes
        True
    """

    __slots__ = (
        "_building_key",
        "_key",
        "_keys",
        "_runner",
        "add_errors",
        "bits",
        "capacity",
        "error_rate",
        "fail_open",
        "hashes",
        "name",
        "pending",
        "rejected",
    )

    def __init__(self, name: str, *, capacity: int, error_rate: float) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError("name", name, "1 to 64 characters from A-Z a-z 0-9 _ . - /")
        check_int("capacity", capacity, minimum=1, maximum=10**10)
        check_number(
            "error_rate", error_rate, above=0, below=0.5, accepted="a number in (0, 0.5), e.g. 0.01"
        )
        bits = math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2)
        if bits > MAX_BITS:
            raise ConfigurationError(
                "capacity",
                capacity,
                f"at most {MAX_BITS} bits (Redis' bitmap limit); this capacity and "
                f"error_rate={error_rate} need {bits}: lower one of them or use several filters",
            )
        self.name = name
        self.capacity = capacity
        self.error_rate = float(error_rate)
        self.bits = bits
        self.hashes = max(1, round(bits / capacity * math.log(2)))
        self._runner: ScriptRunner | None = None
        self._key = b""
        self._building_key = b""
        self._keys: KeySpace | None = None
        #: Items whose add failed, sent again with the next add (see the guarantees).
        self.pending: set[bytes] = set()
        #: For the Cache's statistics: `may_contain` answers "absent", checks that failed
        #: open, adds that failed.
        self.rejected = self.fail_open = self.add_errors = 0

    def __repr__(self) -> str:
        return (
            f"<BloomFilter {self.name!r} capacity={self.capacity} "
            f"error_rate={self.error_rate} bits={self.bits} hashes={self.hashes}>"
        )

    @property
    def bound(self) -> bool:
        return self._runner is not None

    def bind(self, runner: ScriptRunner, *, namespace: str) -> None:
        """Attach to a Redis (a Cache's backend). The first binding stays; later ones no-op."""
        if self._runner is None:
            self._runner = runner
            self._key = hash_tag(namespace.encode(), self.name.encode()) + b":bloom"
            self._building_key = self._key + b":rebuild"
            self._keys = KeySpace(namespace)

    @property
    def key(self) -> bytes:
        """The Redis key of the live bitmap."""
        self._require_runner()
        return self._key

    def positions(self, item: Key) -> list[int]:
        """The ``hashes`` bit positions of ``item`` (sync: pure computation)."""
        h1, h2 = mmh3.hash64(_as_bytes(item), signed=False)
        m = self.bits
        return [(h1 + i * h2) % m for i in range(self.hashes)]

    def _packed(self, items: Sequence[Key]) -> bytes:
        positions = [p for item in items for p in self.positions(item)]
        return struct.pack(f">{len(positions)}I", *positions)

    async def add(self, *items: Key) -> None:
        """
        Add ``items``: one script call per 1,000 items, all sent in one round trip.

        Raises:
            BackendError: Redis refused or did not answer; the items are kept (see above).
        """
        runner = self._require_runner()
        retried = list(self.pending)
        batch = [*map(_as_bytes, items), *retried]
        calls = [
            runner.eval(
                ADD,
                (self._key, self._building_key),
                (self._packed(batch[start : start + 1000]),),
            )
            for start in range(0, len(batch), 1000)
        ]
        try:
            await asyncio.gather(*calls)
        except BaseException:
            self.add_errors += 1
            if len(self.pending) < MAX_PENDING:
                self.pending.update(batch[: MAX_PENDING - len(self.pending)])
            else:
                self.pending.add(b"")  # overflowed: `check` fails open for everything
            raise
        self.pending.difference_update(retried)

    async def add_many(
        self, items: AsyncIterable[Key] | Iterable[Key], *, batch: int = 1000
    ) -> int:
        """
        Add every item of a (possibly async) iterable, ``batch`` items per round trip, so a
        bulk load needs bounded memory. Returns how many were added.
        """
        check_int("batch", batch, minimum=1)
        added = 0
        chunk: list[Key] = []
        async for item in aiter_of(items):
            chunk.append(item)
            if len(chunk) >= batch:
                await self.add(*chunk)
                added += len(chunk)
                chunk = []
        if chunk:
            await self.add(*chunk)
            added += len(chunk)
        return added

    async def contains(self, item: Key) -> bool:
        """
        False if ``item`` was definitely never added; True if it may have been, or if the
        bitmap is missing (fail open). One round trip.
        """
        return await self.check(item) != 0

    async def contains_many(self, items: Sequence[Key]) -> list[bool]:
        """`contains` for many items in one round trip."""
        return [answer != 0 for answer in await self._query(items)]

    def counters(self) -> dict[str, int]:
        """The filter's share of a Cache's statistics."""
        return {
            "bloom_rejected": self.rejected,
            "bloom_fail_open": self.fail_open,
            "bloom_add_errors": self.add_errors,
        }

    async def may_contain(self, item: Key) -> bool:
        """
        `contains` for the Cache's misses: False only for "definitely absent"; a missing
        bitmap or a Redis error fails open. Counted in `rejected` and `fail_open`.
        """
        try:
            answer = await self.check(item)
        except BackendError:
            answer = -1
        if answer < 0:
            self.fail_open += 1
        elif answer == 0:
            self.rejected += 1
        return answer != 0

    async def filled(self, value_key: bytes, value: object) -> None:
        """A Cache wrote ``value`` at ``value_key``: add its user key, quietly (`add_quietly`)."""
        if value is not None and self._keys is not None:
            await self.add_quietly(self._keys.user_key(value_key))

    async def add_quietly(self, item: Key) -> None:
        """`add` for the Cache's fills: a failure is counted and kept pending, not raised."""
        with contextlib.suppress(BackendError):
            await self.add(item)

    async def check(self, item: Key) -> int:
        """1 maybe present, 0 definitely absent, -1 the bitmap is missing (for the Cache)."""
        if self.pending and (_as_bytes(item) in self.pending or b"" in self.pending):
            return 1  # its add failed: never answer "absent" for it
        (answer,) = await self._query([item])
        return answer

    async def _query(self, items: Sequence[Key]) -> list[int]:
        if not items:
            return []
        runner = self._require_runner()
        answers = await runner.eval(CONTAINS, (self._key,), (self.hashes, self._packed(items)))
        return [int(a) for a in answers]

    async def rebuild(self, items: AsyncIterable[Key] | Iterable[Key], *, batch: int = 1000) -> int:
        """
        Replace the filter's content with ``items``, built aside and swapped in atomically.

        Readers keep using the old bitmap until the swap; items added by others during the
        rebuild land in both. Returns how many items were added.
        """
        check_int("batch", batch, minimum=1)
        runner = self._require_runner()
        await runner.eval(START_REBUILD, (self._building_key,), (self.bits - 1,))
        added = 0
        chunk: list[Key] = []
        async for item in aiter_of(items):
            chunk.append(item)
            if len(chunk) >= batch:
                added += await self._add_to_rebuild(runner, chunk)
                chunk = []
        if chunk:
            added += await self._add_to_rebuild(runner, chunk)
        await runner.eval(FINISH_REBUILD, (self._building_key, self._key), ())
        return added

    async def _add_to_rebuild(self, runner: ScriptRunner, chunk: list[Key]) -> int:
        # KEYS[1] is the rebuild bitmap; the ADD script sets KEYS[2] too if it exists: pass
        # the rebuild bitmap twice so only it is written.
        await runner.eval(ADD, (self._building_key, self._building_key), (self._packed(chunk),))
        return len(chunk)

    def _require_runner(self) -> ScriptRunner:
        if self._runner is None:
            raise ConfigurationError(
                "bloom",
                self,
                "a filter given to a Cache first: Cache(..., bloom=filter)",
            )
        return self._runner
