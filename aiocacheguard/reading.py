"""Reading records: one Redis read per key at a time in a process, decoded once, counted."""

from __future__ import annotations

from functools import partial

from .backend import RedisBackend
from .codec import Entry, RecordCodec
from .errors import BackendError
from .guards.singleflight import SharedCall
from .metrics import Counters

__all__ = ("Reader",)


class Reader:
    """
    Reads the entries of one Cache. Concurrent reads of a key share the first caller's read,
    run in that caller's own task (no task is created for a read nobody shares); statistics
    count each Redis read once, however many callers it served. With a ``replica``, a read
    the primary fails (or its circuit breaker refuses) is made on the replica.
    """

    __slots__ = ("_backend", "_codec", "_counters", "_reads", "_replica")

    def __init__(
        self,
        backend: RedisBackend,
        codec: RecordCodec,
        counters: Counters,
        *,
        replica: RedisBackend | None = None,
    ) -> None:
        self._backend = backend
        self._replica = replica
        self._codec = codec
        self._counters = counters
        self._reads: SharedCall[bytes, Entry | None] = SharedCall()

    def __contains__(self, rkey: object) -> bool:
        """Whether a read of the key is on its way."""
        return rkey in self._reads

    async def read(self, rkey: bytes) -> Entry | None:
        """
        The key's entry; None when nothing usable is stored (counted as a miss).

        Raises:
            BackendError: Redis failed or did not answer within its budget.
        """
        return await self._reads.run(rkey, partial(self._fetch, rkey))

    def forget(self, rkey: bytes) -> None:
        """Later reads of the key make their own (the one on its way may predate a write)."""
        self._reads.forget(rkey)

    async def _fetch(self, rkey: bytes) -> Entry | None:
        try:
            data = await self._backend.get(rkey)
        except BackendError:
            if self._replica is None:
                raise
            data = await self._replica.get(rkey)  # the primary failed: its replica may answer
            self._counters.replica_reads += 1
        entry = None if data is None else self._codec.decode(data)
        counters = self._counters
        if entry is None:
            counters.misses += 1
        elif entry.record.negative:
            counters.negative_hits += 1
        else:
            counters.hits += 1
            soft = entry.record.soft_expires_at
            if soft is not None and soft <= self._codec.clock() < entry.record.expires_at:
                counters.soft_expired_served += 1
        return entry
