"""Reading records: one Redis read per key at a time in a process, decoded once, counted."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from .backend import RedisBackend
from .codec import Entry, RecordCodec
from .errors import BackendError
from .guards.singleflight import SharedCall
from .metrics import Counters
from .near import NearCache
from .policy import Policy

__all__ = ("Reader",)


class Reader:
    """
    Reads the entries of one Cache. Concurrent reads of a key share the first caller's read,
    run in that caller's own task (no task is created for a read nobody shares); statistics
    count each Redis read once, however many callers it served. With a ``replica``, a read
    the primary fails (or its circuit breaker refuses) is made on the replica. With a
    ``near`` cache (the L1), a key it holds is served from it, and what Redis returns fills it.
    """

    __slots__ = ("_backend", "_codec", "_counters", "_near", "_reads", "_replica")

    def __init__(
        self,
        backend: RedisBackend,
        codec: RecordCodec,
        counters: Counters,
        *,
        replica: RedisBackend | None = None,
        near: NearCache | None = None,
    ) -> None:
        self._backend = backend
        self._near = near
        if near is not None:
            near.on_change = self._changed
        self._replica = replica
        self._codec = codec
        self._counters = counters
        self._reads: SharedCall[bytes, Entry | None] = SharedCall()

    def __contains__(self, rkey: object) -> bool:
        """Whether a read of the key is on its way."""
        return rkey in self._reads

    async def read(
        self, rkey: bytes, local_ttl: float | None = None, *, coalesced: bool = False
    ) -> Entry | None:
        """
        The key's entry; None when nothing usable is stored (counted as a miss). ``local_ttl``
        bounds how long the L1 may serve what Redis returns (0: not kept). With ``coalesced``,
        sharing a read on its way is counted (`Statistics.coalesced`).

        Raises:
            BackendError: Redis failed or did not answer within its budget.
        """
        near = self._near
        if near is not None and local_ttl != 0:
            entry = near.get(rkey, local_ttl)
            if entry is not None:
                return entry
        reads = self._reads
        shared = reads.lead(rkey)
        if shared is None:  # a read of the key is on its way: share it
            if coalesced:
                self._counters.coalesced += 1
            return await reads.run(rkey, partial(self._fetch, rkey, local_ttl))
        # SharedCall.run's leader inlined: this is every lone hit's path.
        entry = None
        error: BaseException | None = None
        try:
            entry = await self._fetch(rkey, local_ttl)
            return entry
        except BaseException as exc:
            error = exc
            raise
        finally:
            reads.end(rkey, shared, entry, error)

    def local(self, rkey: bytes, now: float, policy: Policy, returns: object) -> Entry | None:
        """
        What the L1 holds for the key, whatever its local expiry, if ``policy.stale_if_error``
        lets it be served: the fallback chain's step for an unreachable Redis.
        """
        held = None if self._near is None else self._near.stale(rkey)
        return held if held is not None and held.stale_if_error(now, policy, returns) else None

    def forget(self, rkey: bytes) -> None:
        """
        This process wrote the key: later reads make their own (the one on its way may predate
        the write), and the L1 stops serving what it held, at once.
        """
        self._reads.forget(rkey)
        if self._near is not None:
            self._near.invalidate(rkey)

    def _changed(self, rkeys: Sequence[bytes] | None) -> None:
        """Redis announced these keys changed (None: all): later readers read again."""
        if rkeys is None:
            self._reads.forget_all()
        else:
            for rkey in rkeys:
                self._reads.forget(rkey)

    def forget_all(self) -> None:
        """This process removed many keys (`bulk.clear`): nothing read before is served."""
        self._reads.forget_all()
        if self._near is not None:
            self._near.flush()

    async def _fetch(self, rkey: bytes, local_ttl: float | None) -> Entry | None:
        near = self._near
        token = 0  # no L1 fill
        if near is not None and near.serving and local_ttl != 0:
            token = near.begin(rkey)  # before the read: an invalidation from now on voids it
        try:
            data = await self._backend.get(rkey)
        except BackendError:
            if near is not None and token:
                near.abandon(rkey, token)
                token = 0  # a replica may lag behind what invalidations said: not kept
            if self._replica is None:
                raise
            data = await self._replica.get(rkey)  # the primary failed: its replica may answer
            self._counters.replica_reads += 1
        except BaseException:
            if near is not None and token:
                near.abandon(rkey, token)
            raise
        if isinstance(data, int):  # past max_value_bytes, refused inside Redis: a miss
            self._codec.refused(rkey, data)
            data = None
        entry = None if data is None else self._codec.decode(data, rkey)
        if near is not None and token:
            near.fill(rkey, token, entry, len(data or b""), local_ttl)
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
