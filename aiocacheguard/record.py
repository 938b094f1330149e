"""
The envelope stored under each cache key: a fixed binary header, then the serialized payload.

Format version 1, big-endian, 33 header bytes::

    offset  size  field
    0       2     magic b"\\xa7\\xc6" (0xA7 cannot start UTF-8 text, so text written by other
                  tools is never mistaken for a record)
    2       1     format version (1)
    3       1     flags: bit 0 = negative result (the loader returned None; no payload)
    4       1     serializer tag (see `aiocacheguard.serializers`)
    5       8     stored_at: wall-clock time of the write, float seconds since the epoch
    13      8     soft_expires_at: logical expiry, or 0.0 when the entry has none
    21      8     expires_at: hard expiry as intended by the policy
    29      4     compute_time: how long the loader took, float32 seconds (XFetch's delta)
    33      -     payload

Wall-clock times are used because several processes (and machines) read the same record;
their clocks are assumed to agree to well under a TTL.

A newer library that writes version 2 must still read version 1. An older library that meets a
version it does not know, or bytes without the magic, treats them as a miss and the next fill
overwrites them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ("FORMAT_VERSION", "HEADER_SIZE", "Record", "RecordError")

MAGIC = b"\xa7\xc6"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">2sBBBdddf")
_FLAG_NEGATIVE = 0x01
#: Bytes before the payload. Every write has a distinct header (it holds the write's times), so
#: a header identifies one stored copy: the rebuild lock compares it to detect a replacement.
HEADER_SIZE = _HEADER.size


class RecordError(ValueError):
    """Bytes under a cache key are not a record this version can read (foreign or corrupt)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded envelope. ``payload`` is still serialized; ``negative`` means "absent"."""

    payload: bytes
    negative: bool
    serializer_tag: int
    stored_at: float
    expires_at: float
    soft_expires_at: float | None = None
    compute_time: float = 0.0

    def encode(self) -> bytes:
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            _FLAG_NEGATIVE if self.negative else 0,
            self.serializer_tag,
            self.stored_at,
            self.soft_expires_at or 0.0,
            self.expires_at,
            self.compute_time,
        )
        return header + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """
        Read a record.

        Raises:
            RecordError: the bytes are foreign, truncated, or of an unknown format version.
        """
        if len(data) < _HEADER.size or data[:2] != MAGIC:
            raise RecordError("not an aiocacheguard record")
        _magic, version, flags, tag, stored_at, soft, hard, compute = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise RecordError(f"record format version {version} is not readable by this version")
        negative = bool(flags & _FLAG_NEGATIVE)
        payload = data[_HEADER.size :]
        if negative and payload:
            raise RecordError("negative record with a payload")
        return cls(
            payload=payload,
            negative=negative,
            serializer_tag=tag,
            stored_at=stored_at,
            expires_at=hard,
            soft_expires_at=soft or None,
            compute_time=compute,
        )
