"""
The envelope stored under each cache key: a fixed binary header, then the serialized payload.

Format version 2, big-endian, 41 header bytes::

    offset  size  field
    0       2     magic b"\\xa7\\xc6" (0xA7 cannot start UTF-8 text, so text written by other
                  tools is never mistaken for a record)
    2       1     format version (2)
    3       1     flags: bit 0 = negative result (the loader returned None; no payload)
    4       1     serializer tag (see `aiocacheguard.serializers`)
    5       8     stored_at: wall-clock time of the write, float seconds since the epoch
    13      8     soft_expires_at: logical expiry, or 0.0 when the entry has none
    21      8     expires_at: hard expiry as intended by the policy
    29      4     compute_time: how long the loader took, float32 seconds (XFetch's delta)
    33      8     write_id: random, so that two writes in one clock tick still differ
    41      -     payload

Version 1 (the first 33 bytes of the above, without write_id) is still read. The header
identifies one stored copy (the rebuild lock compares it to detect a replacement); version 1
headers of two writes in the same clock tick with the same TTL could be equal, which the
write id rules out.

Wall-clock times are used because several processes (and machines) read the same record;
their clocks are assumed to agree to well under a TTL.

A newer library that writes version 2 must still read version 1. An older library that meets a
version it does not know, or bytes without the magic, treats them as a miss and the next fill
overwrites them.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, field

__all__ = ("FORMAT_VERSION", "HEADER_SIZE", "Record", "RecordError", "header_of")

MAGIC = b"\xa7\xc6"
FORMAT_VERSION = 2
_HEADER_V1 = struct.Struct(">2sBBBdddf")
_HEADER = struct.Struct(">2sBBBdddfQ")
_FLAG_NEGATIVE = 0x01
#: Bytes before the payload (version 2). Every write has a distinct header (its times and a
#: random write id), so a header identifies one stored copy.
HEADER_SIZE = _HEADER.size


def header_of(data: bytes) -> bytes:
    """The header of the stored copy ``data`` (its identity), whatever its version."""
    if len(data) > 2 and data[2] == 1:
        return data[: _HEADER_V1.size]
    return data[:HEADER_SIZE]


def _write_id() -> int:
    return int.from_bytes(secrets.token_bytes(8), "big")


class RecordError(ValueError):
    """Bytes under a cache key are not a record this version can read (foreign or corrupt)."""


@dataclass(slots=True)
class Record:
    """
    One decoded envelope. ``payload`` is still serialized; ``negative`` means "absent".

    Treat it as immutable (one decoded record can be shared by many callers, and by the L1).
    It is not a frozen dataclass only because every hit decodes one: a frozen one's
    ``__init__`` (``object.__setattr__`` per field) cost more than the rest of the decode.
    """

    payload: bytes
    negative: bool
    serializer_tag: int
    stored_at: float
    expires_at: float
    soft_expires_at: float | None = None
    compute_time: float = 0.0
    write_id: int = field(default_factory=_write_id, compare=False)

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
            self.write_id,
        )
        return header + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """
        Read a record.

        Raises:
            RecordError: the bytes are foreign, truncated, or of an unknown format version.
        """
        if len(data) < _HEADER_V1.size or data[:2] != MAGIC:
            raise RecordError("not an aiocacheguard record")
        version = data[2]
        if version == FORMAT_VERSION and len(data) >= _HEADER.size:
            _m, _v, flags, tag, stored_at, soft, hard, compute, write_id = _HEADER.unpack_from(data)
            payload = data[_HEADER.size :]
        elif version == 1:
            _m, _v, flags, tag, stored_at, soft, hard, compute = _HEADER_V1.unpack_from(data)
            write_id, payload = 0, data[_HEADER_V1.size :]
        else:
            raise RecordError(f"record format version {version} is not readable by this version")
        negative = bool(flags & _FLAG_NEGATIVE)
        if negative and payload:
            raise RecordError("negative record with a payload")
        return cls(payload, negative, tag, stored_at, hard, soft or None, compute, write_id)
