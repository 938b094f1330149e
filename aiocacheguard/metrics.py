"""Statistics: plain counters kept by the Cache, read as a frozen snapshot."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ("Statistics",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Statistics:
    """
    A snapshot of a Cache's counters since it was created.

    Reads of Redis are counted once per flight, not once per caller: when 1,000 callers share
    one flight that misses, ``misses`` grows by 1 and ``coalesced`` by 999.

    Attributes:
        hits: Flights that found a fresh value in Redis.
        misses: Flights that found nothing usable in Redis (absent, corrupt or foreign bytes).
        negative_hits: Flights that found a cached "absent" (a loader's ``None``).
        coalesced: Callers that joined a flight another caller had started.
        loader_calls: Times a loader was called.
        loader_errors: Times a loader raised (nothing was cached from it).
        lock_acquired: Rebuild locks this process took (it then called the loader).
        lock_waits: Flights that found another process rebuilding and waited for its fill.
        takeovers: Locks taken after the previous holder's lease ran out without a fill
            (the holder died or stalled).
        lock_lost: Fills refused because the lease had passed to another holder, or a
            ``set``/``delete`` superseded the rebuild; the value was still returned locally.
        decode_errors: Records that could not be decoded and were treated as a miss.
        redis_errors: Redis commands that failed or ran out of time.
    """

    hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    coalesced: int = 0
    loader_calls: int = 0
    loader_errors: int = 0
    lock_acquired: int = 0
    lock_waits: int = 0
    takeovers: int = 0
    lock_lost: int = 0
    decode_errors: int = 0
    redis_errors: int = 0


class Counters:
    """The mutable twin of `Statistics`; only the Cache writes to it."""

    __slots__ = tuple(f.name for f in fields(Statistics))

    hits: int
    misses: int
    negative_hits: int
    coalesced: int
    loader_calls: int
    loader_errors: int
    lock_acquired: int
    lock_waits: int
    takeovers: int
    lock_lost: int
    decode_errors: int
    redis_errors: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self, **overrides: int) -> Statistics:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(overrides)
        return Statistics(**values)
