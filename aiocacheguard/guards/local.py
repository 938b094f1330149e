"""
The L1: a bounded in-process map in front of Redis, invalidated from Redis (CLIENT TRACKING,
`aiocacheguard.tracking`), so a hit costs no I/O at all.

`LocalCache` is the configuration (``Cache(..., local=LocalCache(...))``); `LocalStore` is the
map it configures. The store is synchronous and does no I/O: its owner calls `LocalStore.get`
before going to Redis, brackets every Redis read (or write) whose result it wants to keep with
`LocalStore.begin_fill` / `LocalStore.finish_fill`, and feeds it the invalidations the
listener receives (`LocalStore.invalidate`, `LocalStore.clear`, `LocalStore.bypass`).

Eviction: LRU, with TinyLFU admission fed by misses. Measured with ``benchmarks/local_eviction.py``
(a Zipf trace, 100,000 keys, 1 M requests, seed 1), hit ratios at 1,000 / 10,000 entries:

    ====================  ===============  ===============
    policy                Zipf 0.8         Zipf 1.0
    ====================  ===============  ===============
    LRU                   0.204 / 0.467    0.506 / 0.735
    CLOCK                 0.214 / 0.479    0.518 / 0.743
    W-TinyLFU (Caffeine)  0.310 / 0.548    0.595 / 0.777
    this store            0.273 / 0.536    0.576 / 0.778
    ====================  ===============  ===============

W-TinyLFU hits most often, but it counts every access, hits included, in its sketch and moves
entries between three segments: in Python its hit costs 1.3 to 3 us against 0.1 to 0.5 us for
LRU's one ``move_to_end`` (same runs, on a shared 2-CPU machine), and the hit is what an L1 is
for (issue 12 asks 50 x a Redis GET through the Cache's layers, a budget under 3 us). Kept
here: LRU's hit (a dict lookup, an expiry check, ``move_to_end``; 2.2 M hits/s measured) and
W-TinyLFU's admission test on the miss path only, where a Redis round trip (~140 us) dwarfs a
sketch update (~1 us): `begin_fill` counts the key in a `FrequencySketch`, and a full store
admits a newcomer only if Redis was asked for it more often than for the LRU victim. That
recovers 65 to 100 % of W-TinyLFU's gain over LRU; without W-TinyLFU's window, a newly hot
key needs a second or third miss to get in. CLOCK saves nothing in CPython, where
``move_to_end`` is one C call, and its eviction scan costs more.

The read/invalidate race (the Redis reference on client-side caching): the invalidation of a
key travels on another connection than the read of it, so it can arrive *before* the reply of
a read that returned the old value. `begin_fill` leaves a placeholder before the read;
an `invalidate` of that key (or `clear`, `bypass`, `resume`) removes it; `finish_fill` stores
only while the placeholder is still the one it left. A local write follows the same protocol
(begin before the Redis write, finish after), and a newer `begin_fill` of the same key replaces
an older one's placeholder, so the older result (read earlier) is dropped.

Guarantees:
    - A hit is one dict lookup, one clock read, an expiry comparison and ``move_to_end``; no
      await, no lock, no allocation unless ``copy_on_read``.
    - An entry expires at ``min(now + ttl, not_after)``: the owner passes the Redis record's
      soft (or else hard) expiry as ``not_after``, so the L1 never serves past it, and stale
      serving and refreshes stay decisions taken on the Redis record. A reader may ask for
      less (`get`'s ``max_age``): an entry stored under a longer TTL is then not served to it.
    - A value read before an invalidation of its key (or a flush) arrived is never stored.
    - At most ``max_entries`` entries, and with ``max_bytes`` at most that many accounted bytes
      (the encoded size the owner reports plus `ENTRY_OVERHEAD` an entry); least recently used
      entries go first, an entry larger than the whole budget is not stored, and a full store
      may refuse a fill (counted in ``refused``): that read is simply not kept.
    - While bypassing (invalidations are not arriving) the store serves nothing and stores
      nothing; what it held is kept aside for `stale` only, and dropped by `resume` along with
      fills begun before it.

Limitations:
    - Values are shared: every hit returns the same object, so a caller that mutates it changes
      what the next caller gets. ``copy_on_read=True`` returns a ``copy.deepcopy`` instead
      (0.3 M hits/s against 2.2 M for a small dict; see the benchmark).
    - ``max_bytes`` is an accounting of reported sizes, not a measurement: decoded Python
      objects are usually larger than their encoding.
    - Expiry uses the store's clock (``time.time`` by default, the clock records are written
      with); a clock step moves every entry's expiry alike.
    - Per process, not thread-safe: the owner calls it from its event loop only.
"""

from __future__ import annotations

import collections
import copy
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .._checks import check_instance, check_int, check_seconds

__all__ = (
    "ENTRY_OVERHEAD",
    "FrequencySketch",
    "LocalCache",
    "LocalStatistics",
    "LocalStore",
)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")

#: Bytes accounted to every entry on top of its reported size: the key, the entry tuple and its
#: slot in the map (about what CPython spends on a short str key, a 4-tuple and the float of
#: its fill time).
ENTRY_OVERHEAD = 192

_SKETCH_MAX_WIDTH = 1 << 22  # 16 MiB of counters at most, whatever max_entries says


class FrequencySketch:
    """
    How often keys were asked of Redis lately: a count-min sketch of 4 rows of 4-bit-range
    counters (saturating at 15), every counter halved after ``10 x capacity`` additions so
    that old popularity fades (TinyLFU's aging). Approximate, never under-counts between
    halvings. Each row has the next power of two above ``4 x capacity`` counters (one byte
    each, as many as Caffeine's packed table): 256 KiB for 10,000 entries.

    Example:
        >>> sketch = FrequencySketch(100)
        >>> for _ in range(3): sketch.add("hot")
        >>> sketch.add("cold")
        >>> sketch.estimate("hot") >= 3 > sketch.estimate("cold") >= 1
        True
    """

    __slots__ = ("_additions", "_mask", "_rows", "_sample")

    _SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
    _HALF = bytes(c >> 1 for c in range(256))

    def __init__(self, capacity: int) -> None:
        width = 64
        while width < 4 * capacity and width < _SKETCH_MAX_WIDTH:
            width <<= 1
        self._mask = width - 1
        self._rows = tuple((bytearray(width), seed) for seed in self._SEEDS)
        self._additions = 0
        self._sample = 10 * capacity

    def add(self, key: Hashable) -> None:
        h = hash(key)
        mask = self._mask
        for row, seed in self._rows:
            i = (h * seed >> 32) & mask
            if row[i] < 15:
                row[i] += 1
        self._additions += 1
        if self._additions >= self._sample:
            self._additions //= 2
            for row, _ in self._rows:
                row[:] = row.translate(self._HALF)

    def estimate(self, key: Hashable) -> int:
        h = hash(key)
        mask = self._mask
        return min(row[(h * seed >> 32) & mask] for row, seed in self._rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalCache:
    """
    The L1 of a Cache (``Cache(..., local=LocalCache(...))``).

    Args:
        max_entries: Entries kept at most; the least recently used go first.
        ttl: Seconds an entry is served at most, whatever the Redis record says.
        max_bytes: Accounted bytes kept at most (reported encoded sizes plus
            `ENTRY_OVERHEAD` an entry), or None for no byte bound.
        copy_on_read: Return a deep copy on every hit, so callers may mutate what they get.

    Example:
        >>> LocalCache(max_bytes=64 * 1024 * 1024)
        LocalCache(max_entries=10000, ttl=5.0, max_bytes=67108864, copy_on_read=False)
    """

    max_entries: int = 10_000
    ttl: float = 5.0
    max_bytes: int | None = None
    copy_on_read: bool = False

    def __post_init__(self) -> None:
        check_int("max_entries", self.max_entries, minimum=1, maximum=100_000_000)
        check_seconds("ttl", self.ttl, maximum=24 * 3600.0)
        if self.max_bytes is not None:
            check_int("max_bytes", self.max_bytes, minimum=ENTRY_OVERHEAD)
        check_instance("copy_on_read", self.copy_on_read, bool)


@dataclass(frozen=True, slots=True)
class LocalStatistics:
    """
    A snapshot of a `LocalStore`'s counters.

    Attributes:
        local_hits: Reads served from the store.
        local_misses: Reads it could not serve (absent, expired, or bypassing).
        local_evictions: Entries removed to stay within ``max_entries`` / ``max_bytes``.
        invalidations: Keys invalidated plus flushes (`clear`, `bypass`), whether or not the
            store held anything for them.
        refused: Fills not admitted into a full store: Redis was asked for the key less
            often (by the frequency sketch) than for the entry it would have evicted.
        entries: Entries held now.
        bytes: Accounted bytes held now.
        bypassing: Whether the store is refusing to serve (invalidations not arriving).
    """

    local_hits: int
    local_misses: int
    local_evictions: int
    invalidations: int
    refused: int
    entries: int
    bytes: int
    bypassing: bool


class LocalStore(Generic[K, V]):
    """
    The bounded, expiring, invalidated map a `LocalCache` configures. Sync; no I/O.

    Args:
        config: Its bounds and TTL.
        clock: Seconds on the clock ``not_after`` is given in (default ``time.time``, the
            clock Redis records carry).

    Example:
        >>> store = LocalStore(LocalCache(), clock=lambda: 100.0)
        >>> token = store.begin_fill("k")          # before the Redis read
        >>> store.finish_fill("k", token, "v", not_after=103.0, size=1)
        True
        >>> store.get("k")
        'v'
        >>> token = store.begin_fill("j")
        >>> store.invalidate("j")                  # arrived before the read's reply
        >>> store.finish_fill("j", token, "old", size=3)
        False
    """

    __slots__ = (
        "_bytes",
        "_clock",
        "_copy",
        "_entries",
        "_fills",
        "_max_bytes",
        "_max_entries",
        "_next_token",
        "_sketch",
        "_stale",
        "bypassing",
        "config",
        "evictions",
        "hits",
        "invalidations",
        "misses",
        "refused",
    )

    def __init__(self, config: LocalCache, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._copy = config.copy_on_read
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        # key -> (value, expires_at, accounted bytes, filled_at); insertion order is recency
        # order. ``filled_at`` lets a reader ask for a shorter local TTL than the entry's own.
        self._entries: collections.OrderedDict[K, tuple[V, float, int, float]] = (
            collections.OrderedDict()
        )
        # What was held when the store began bypassing: for `stale` only.
        self._stale: dict[K, tuple[V, float, int, float]] = {}
        # key -> token of the fill whose placeholder is current; oldest first.
        self._fills: dict[K, int] = {}
        self._next_token = 0
        self._sketch = FrequencySketch(config.max_entries)
        self._bytes = 0
        self.bypassing = False
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.invalidations = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, default: D | None = None, max_age: float | None = None) -> V | D | None:
        """
        The value held for ``key`` if it has not expired, else ``default``. With ``max_age``
        (a caller's local TTL), only if it was stored less than that many seconds ago, too:
        an entry filled under a longer TTL is not served to a caller that asks for a shorter
        one.
        """
        entry = self._entries.get(key)
        if entry is not None:
            now = self._clock()
            if entry[1] > now and (max_age is None or now - entry[3] < max_age):
                self._entries.move_to_end(key)
                self.hits += 1
                return copy.deepcopy(entry[0]) if self._copy else entry[0]
        # An expired entry stays (for `stale`) until evicted or replaced: it is not moved, so
        # it drifts to the least recently used end.
        self.misses += 1
        return default

    def stale(self, key: K, default: D | None = None) -> V | D | None:
        """
        The value held for ``key`` whatever its expiry, bypassing or not (not counted as a
        hit): the last resort of a fallback chain, for its owner to judge. Held entries are
        kept through `bypass` for this, and dropped by `resume`.
        """
        entry = self._entries.get(key)
        if entry is None:
            entry = self._stale.get(key)
            if entry is None:
                return default
        return copy.deepcopy(entry[0]) if self._copy else entry[0]

    def begin_fill(self, key: K) -> int:
        """
        Leave a placeholder for ``key`` before the Redis read (or write) whose result
        `finish_fill` will offer; the token identifies it.
        """
        self._next_token += 1
        token = self._next_token
        fills = self._fills
        fills.pop(key, None)  # re-inserted last: the dict stays in age order
        fills[key] = token
        if len(fills) > self._max_entries:
            # Fills abandoned without finish_fill (a cancelled read): drop the oldest. Its
            # finish_fill, if it ever comes, stores nothing, which is always safe.
            del fills[next(iter(fills))]
        # A fill follows a miss: the sketch learns how often each key is asked of Redis.
        self._sketch.add(key)
        return token

    def finish_fill(
        self,
        key: K,
        token: int,
        value: V,
        *,
        not_after: float | None = None,
        size: int = 0,
        ttl: float | None = None,
    ) -> bool:
        """
        Store ``value`` for ``key`` if nothing invalidated the key since `begin_fill` gave
        ``token``. Returns whether it was stored.

        Args:
            not_after: The Redis record's soft expiry, or its hard expiry if it has none (on
                the store's clock); the entry never outlives it.
            size: The encoded size of the value, for ``max_bytes``.
            ttl: This entry's local TTL (a policy's ``local_ttl``), instead of the config's.
        """
        if self._fills.get(key) != token:
            return False
        del self._fills[key]
        if self.bypassing:
            return False
        now = self._clock()
        expires_at = now + (self.config.ttl if ttl is None else ttl)
        if not_after is not None and not_after < expires_at:
            expires_at = not_after
        if expires_at <= now:
            return False
        accounted = size + ENTRY_OVERHEAD
        max_bytes = self._max_bytes
        if max_bytes is not None and accounted > max_bytes:
            self._remove(key)
            return False
        self._remove(key)
        entries = self._entries
        if self._full(accounted):
            # Entries past their expiry make room first, whatever their popularity.
            while entries and next(iter(entries.values()))[1] <= now:
                self._bytes -= entries.popitem(last=False)[1][2]
            # Still full: admit the newcomer only if Redis was asked for it more often than
            # for the entry it would evict (TinyLFU admission), so a run of one-off reads
            # cannot flush the hot set.
            if self._full(accounted):
                sketch = self._sketch
                if sketch.estimate(key) <= sketch.estimate(next(iter(entries))):
                    self.refused += 1
                    return False
        entries[key] = (value, expires_at, accounted, now)
        self._bytes += accounted
        self._evict()
        return True

    def abandon_fill(self, key: K, token: int) -> None:
        """Withdraw the placeholder of a fill that will not finish (its read failed)."""
        if self._fills.get(key) == token:
            del self._fills[key]

    def invalidate(self, key: K) -> None:
        """Forget ``key``: its entry and any fill in progress (the invalidation path)."""
        self.invalidations += 1
        self._fills.pop(key, None)
        self._remove(key)
        self._stale.pop(key, None)

    def clear(self) -> None:
        """Forget everything, fills in progress included (FLUSHDB, or a lost connection)."""
        self.invalidations += 1
        self._fills.clear()
        self._entries.clear()
        self._stale.clear()
        self._bytes = 0

    def bypass(self) -> None:
        """
        Serve and store nothing until `resume` (invalidations not arriving). Entries held are
        set aside for `stale` only (bounded by what was held), not served.
        """
        self._fills.clear()
        if self._entries:
            self.invalidations += 1
            self._stale.update(self._entries)
            self._entries.clear()
            self._bytes = 0
        self.bypassing = True

    def resume(self) -> None:
        """
        Serve again, once invalidations arrive again: whatever was held or set aside may
        have missed some, so it is dropped; reads begun before are dropped too.
        """
        self._fills.clear()
        self._entries.clear()
        self._stale.clear()
        self._bytes = 0
        self.bypassing = False

    def statistics(self) -> LocalStatistics:
        return LocalStatistics(
            local_hits=self.hits,
            local_misses=self.misses,
            local_evictions=self.evictions,
            invalidations=self.invalidations,
            refused=self.refused,
            entries=len(self._entries),
            bytes=self._bytes,
            bypassing=self.bypassing,
        )

    @property
    def bytes(self) -> int:
        """Accounted bytes held now."""
        return self._bytes

    def _full(self, incoming: int) -> bool:
        """Whether storing ``incoming`` more bytes would evict something."""
        max_bytes = self._max_bytes
        return bool(self._entries) and (
            len(self._entries) >= self._max_entries
            or (max_bytes is not None and self._bytes + incoming > max_bytes)
        )

    def _remove(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]

    def _evict(self) -> None:
        entries = self._entries
        max_bytes = self._max_bytes
        while len(entries) > self._max_entries or (
            max_bytes is not None and self._bytes > max_bytes
        ):
            _, (_, _, accounted, _) = entries.popitem(last=False)
            self._bytes -= accounted
            self.evictions += 1
