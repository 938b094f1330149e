"""
The record codec: values to stored records under a policy's TTLs, and stored bytes back to
entries, decoded once for every caller that shares them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from ._types import Serializer
from .errors import SerializationError
from .policy import Policy
from .record import Record, RecordError, header_of
from .serializers import typed_decoder

__all__ = ("Entry", "RecordCodec")


class Entry:
    """
    A record read from Redis, with its payload decoded once for every caller (and once per
    declared type, for callers that declare one).
    """

    __slots__ = ("_codec", "_typed", "header", "record", "value")

    def __init__(
        self, record: Record, value: Any, header: bytes, codec: RecordCodec | None = None
    ) -> None:
        self.record = record
        self.value = value
        self.header = header  # identifies this stored copy (see record.header_of)
        self._codec = codec
        self._typed: dict[object, Any] | None = None

    def result(self, returns: object = None) -> Any:
        """
        What a caller gets: the value (decoded into ``returns`` where one is declared), or
        None for a negative record.

        Raises:
            SerializationError: the payload does not decode into ``returns``.
        """
        if self.record.negative:
            return None
        decode = None if returns is None or self._codec is None else self._codec.decoder(returns)
        if decode is None:
            return self.value
        typed = self._typed
        if typed is None:
            typed = self._typed = {}
        elif returns in typed:
            return typed[returns]
        value = typed[returns] = decode(self.record.payload)
        return value

    def usable(self, returns: object) -> bool:
        """
        Whether `result` can give ``returns``; a stored value of another shape (a deploy that
        changed the type) is counted and treated like a corrupt one: a miss, replaced.
        """
        if returns is None or self.record.negative or self._codec is None:
            return True
        if self._codec.decoder(returns) is None:
            return True
        try:
            self.result(returns)
        except SerializationError:
            if self._codec is not None:
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
        clock: Wall-clock seconds, shared by every process reading the records.
        rng: Draws the TTL jitter.
    """

    __slots__ = ("_decoders", "clock", "decode_errors", "rng", "serializer")

    def __init__(
        self, serializer: Serializer, *, clock: Callable[[], float], rng: random.Random
    ) -> None:
        self.serializer = serializer
        self.clock = clock
        self.rng = rng
        #: Records that could not be decoded (or not into a caller's declared type) and were
        #: treated as a miss.
        self.decode_errors = 0
        self._decoders: dict[object, Callable[[bytes], Any] | None] = {}

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
        self, value: Any, policy: Policy, *, compute_time: float
    ) -> tuple[bytes, float] | None:
        """
        The record bytes of ``value`` and their Redis TTL; None when the policy does not cache
        it (a negative result with ``negative_ttl=None``).

        TTLs are shortened by one random fraction up to ``policy.jitter`` (soft TTL alike), and
        Redis keeps values ``stale_if_error`` longer than their logical expiry.

        Raises:
            SerializationError: the serializer cannot encode ``value``.
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
        return record.encode(), ttl + grace

    def decode(self, data: bytes) -> Entry | None:
        """The entry stored as ``data``; None (and counted) when it is foreign or corrupt."""
        try:
            record = Record.decode(data)
            if record.serializer_tag != self.serializer.tag:
                raise RecordError(f"written with serializer tag {record.serializer_tag}")
            value = None if record.negative else self.serializer.loads(record.payload)
        except Exception:
            # Foreign, corrupt or differently serialized bytes: a miss that the fill overwrites.
            self.decode_errors += 1
            return None
        return Entry(record, value, header_of(data), self)
