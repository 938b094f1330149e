"""
The record codec: values to stored records under a policy's TTLs, and stored bytes back to
entries, decoded once for every caller that shares them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

from ._checks import check_int
from ._episodes import Episode
from ._types import Serializer
from .errors import ValueTooLargeError
from .policy import Policy
from .record import SIGNED_FORMAT_VERSION, Record, RecordError, Signer, header_of
from .serializers import typed_decoder

__all__ = ("DEFAULT_MAX_VALUE_BYTES", "Entry", "RecordCodec")

#: The default limit on a record's size: 16 MiB. Measured on loopback, a 20 MB value blocks
#: the event loop for about 43 ms while it is decoded, and a 100 MB one takes 0.79 s of the
#: default 1 s budget to read: a cache entry that large slows every caller of the process and
#: lives one slow read away from a timeout, so it is refused unless the Cache says otherwise.
#: Redis itself accepts strings up to 512 MB (``proto-max-bulk-len``).
DEFAULT_MAX_VALUE_BYTES: Final = 16 * 1024 * 1024


_UNDECODED: Any = object()


class Entry:
    """
    A record read from Redis, its payload decoded when first asked for, once for every caller
    (and once per declared type, for callers that declare one: a typed hit never pays for the
    untyped decode as well).
    """

    __slots__ = ("_codec", "_typed", "_value", "header", "record")

    def __init__(self, record: Record, header: bytes, codec: RecordCodec) -> None:
        self.record = record
        self.header = header  # identifies this stored copy (see record.header_of)
        self._codec = codec
        self._value: Any = _UNDECODED
        self._typed: dict[object, Any] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Entry:
        """
        The same stored copy, not yet decoded: its values are decoded again, so a caller gets
        objects of its own (the L1's ``copy_on_read``; cheaper than copying decoded values).
        """
        return Entry(self.record, self.header, self._codec)

    @property
    def value(self) -> Any:
        """The untyped value (None for a negative record)."""
        if self._value is _UNDECODED:
            record = self.record
            self._value = None if record.negative else self._codec.serializer.loads(record.payload)
        return self._value

    def result(self, returns: object = None) -> Any:
        """
        What a caller gets: the value (decoded into ``returns`` where one is declared), or
        None for a negative record.

        Raises:
            SerializationError: the payload does not decode into ``returns``.
        """
        if self.record.negative:
            return None
        decode = None if returns is None else self._codec.decoder(returns)
        if decode is None:
            return self.value
        typed = self._typed
        if typed is None:
            typed = self._typed = {}
        elif returns in typed:
            return typed[returns]
        value = typed[returns] = decode(self.record.payload)
        return value

    def result_or(self, default: Any, returns: object = None) -> Any:
        """`result`, or ``default`` where it is not `usable` (counted like it)."""
        if self.record.negative:
            return None
        try:
            return self.result(returns)
        except Exception:  # any error of the serializer's decoder: bytes it cannot read
            self._codec.decode_errors += 1
            return default

    def usable(self, returns: object) -> bool:
        """
        Whether `result` can give ``returns``: a payload that does not decode (corrupt, or of
        another shape after a deploy that changed the type) is counted and treated as a miss,
        replaced by the next fill.
        """
        if self.record.negative:
            return True
        try:
            self.result(returns)
        except Exception:  # any error of the serializer's decoder: bytes it cannot read
            self._codec.decode_errors += 1
            return False
        return True

    def fresh(self, now: float) -> bool:
        """Before its hard expiry (a value past it is kept only for stale_if_error)."""
        return now < self.record.expires_at

    def stale_if_error(self, now: float, policy: Policy, returns: object = None) -> bool:
        """Whether it may be served past its TTL because the loader failed (and is usable)."""
        grace = policy.stale_if_error
        return grace is not None and now < self.record.expires_at + grace and self.usable(returns)


class RecordCodec:
    """
    Encodes values as records and decodes stored bytes into `Entry` objects.

    Args:
        serializer: Turns values into bytes and back; its tag is stored in every record.
        max_value_bytes: The largest record written or decoded (None: no limit); see
            `DEFAULT_MAX_VALUE_BYTES`.
        clock: Wall-clock seconds, shared by every process reading the records.
        rng: Draws the TTL jitter (default: an unseeded `random.Random`).
        signer: Signs every record written; every record read must carry a signature it
            verifies, or it is refused unread (counted in ``forged_records``). None: records
            are neither signed nor checked.

    Raises:
        ConfigurationError: ``max_value_bytes`` is not a positive integer or None.
    """

    __slots__ = (
        "_decoders",
        "_forged_episode",
        "_too_large_episode",
        "_too_large_found",
        "clock",
        "decode_errors",
        "forged",
        "max_value_bytes",
        "rng",
        "serializer",
        "signer",
        "too_large",
    )

    def __init__(
        self,
        serializer: Serializer,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        *,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        signer: Signer | None = None,
    ) -> None:
        if max_value_bytes is not None:
            check_int("max_value_bytes", max_value_bytes, minimum=1)
        self.serializer = serializer
        self.max_value_bytes = max_value_bytes
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311  TTL jitter: spread, not a secret
        #: Records that could not be decoded (or not into a caller's declared type) and were
        #: treated as a miss.
        self.decode_errors = 0
        #: Records past ``max_value_bytes``: refused on write, or found on read (a miss).
        self.too_large = 0
        self._too_large_episode = Episode("loaded values too large to cache")
        self.signer = signer
        #: Records refused because their signature did not verify (``signer`` only).
        self.forged = 0
        self._forged_episode = Episode("signature checks of records")
        self._too_large_found = Episode("stored values too large to read")
        self._decoders: dict[object, Callable[[bytes], Any] | None] = {}

    def counters(self) -> dict[str, int]:
        """The codec's share of a Cache's statistics."""
        return {
            "decode_errors": self.decode_errors,
            "values_too_large": self.too_large,
            "forged_records": self.forged,
        }

    def decoder(self, returns: object) -> Callable[[bytes], Any] | None:
        """
        The serializer's decoder into ``returns``, made once per type; None where there is
        nothing to do beyond the untyped decode (``typing.Any``, or a serializer that cannot
        decode into a type).
        """
        try:
            return self._decoders[returns]
        except KeyError:
            pass
        decode = None
        if returns is not Any and hasattr(self.serializer, "decoder"):
            decode = typed_decoder(self.serializer, returns)
        self._decoders[returns] = decode
        return decode

    def encode(
        self, value: Any, policy: Policy, *, compute_time: float, rkey: bytes
    ) -> tuple[bytes, float] | None:
        """
        The record bytes of ``value`` for the Redis key ``rkey`` (signed for it, with a
        ``signer``) and their Redis TTL; None when the policy does not cache it (a negative
        result with ``negative_ttl=None``).

        TTLs are shortened by one random fraction up to ``policy.jitter`` (soft TTL alike), and
        Redis keeps values ``stale_if_error`` longer than their logical expiry.

        Raises:
            SerializationError: the serializer cannot encode ``value``.
            ValueTooLargeError: the record would be larger than ``max_value_bytes`` (counted).
        """
        negative = value is None
        ttl = policy.negative_ttl if negative else policy.ttl
        if ttl is None:
            return None
        spread = 1.0 - policy.jitter * self.rng.random() if policy.jitter else 1.0
        ttl *= spread
        soft_ttl = None if negative or policy.soft_ttl is None else policy.soft_ttl * spread
        now = self.clock()
        record = Record(
            payload=b"" if negative else self.serializer.dumps(value),
            negative=negative,
            serializer_tag=self.serializer.tag,
            stored_at=now,
            expires_at=now + ttl,
            soft_expires_at=None if soft_ttl is None else now + soft_ttl,
            compute_time=compute_time,
        )
        grace = 0.0 if negative or policy.stale_if_error is None else policy.stale_if_error
        data = record.encode(self.signer, rkey)
        limit = self.max_value_bytes
        if limit is not None and len(data) > limit:
            self.too_large += 1
            raise ValueTooLargeError(len(data), limit)
        return data, ttl + grace

    def not_cached(self, rkey: bytes, error: ValueTooLargeError) -> None:
        """
        A loader's value too large to cache (served, not written): said once per episode with
        counts (`aiocacheguard._episodes`), not once per load.
        """
        self._too_large_episode.failed(
            f"a loaded value is not cached (key {rkey!r}): {error} "
            f"({self.too_large} refused so far)"
        )

    def refused(self, rkey: bytes, size: int) -> None:
        """
        A stored record past ``max_value_bytes`` (written by a client without the limit),
        refused inside Redis by the read (`aiocacheguard.backend.Read`): a counted miss, said
        once per episode with counts, never a failure of Redis.
        """
        self.too_large += 1
        self._too_large_found.failed(
            f"a stored value past max_value_bytes={self.max_value_bytes:,} is read as a miss "
            f"(key {rkey!r}, {size:,} bytes or more, left in Redis until a write replaces it; "
            f"{self.too_large} too large so far)"
        )

    def decode(self, data: bytes, rkey: bytes) -> Entry | None:
        """
        The entry stored as ``data`` under the Redis key ``rkey``; None (and counted) when it
        is foreign, written by another serializer, larger than ``max_value_bytes`` (not even
        its header is read, so a huge record costs its transfer but never blocks the loop
        while decoded), or, with a ``signer``, not signed for ``rkey`` with one of its keys
        (checked before anything of it is read). Its payload is decoded when first used
        (`Entry.usable`).
        """
        limit = self.max_value_bytes
        if limit is not None and len(data) > limit:
            self.too_large += 1
            return None
        signer = self.signer
        if signer is not None and not signer.verify(rkey, data):
            self._refuse(rkey, data)
            return None
        try:
            record = Record.decode(data)
            if record.serializer_tag != self.serializer.tag:
                raise RecordError(f"written with serializer tag {record.serializer_tag}")
        except RecordError:
            # Foreign or differently serialized bytes: a miss that the fill overwrites.
            self.decode_errors += 1
            return None
        return Entry(record, header_of(data), self)

    def _refuse(self, rkey: bytes, data: bytes) -> None:
        """A record that failed its signature check: counted, and said once per episode."""
        self.forged += 1
        unsigned = len(data) < 3 or data[2] != SIGNED_FORMAT_VERSION  # (or not a record at all)
        self._forged_episode.failed(
            f"a record under {rkey!r} was refused ({'unsigned' if unsigned else 'bad signature'}"
            f", {self.forged} refused so far): it is not signed for this key with the Cache's "
            "signing_key or verify_keys. Either processes without the key write to this "
            "namespace, or someone who can write to Redis planted it; treated as a miss"
        )
