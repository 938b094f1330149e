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

Format version 3 is a signed record (a Cache with ``signing_key``): the version 2 header with
version 3, then the signature, then the payload::

    41      32    signature: HMAC-SHA256 of the Redis key and the record's other bytes (`Signer`)
    73      -     payload

Binding the Redis key into the signature means a record signed for one key (or namespace) is
refused under another, so whoever can write to Redis cannot move a signed value to a key it
was not written for.

Wall-clock times are used because several processes (and machines) read the same record;
their clocks are assumed to agree to well under a TTL.

A newer library that writes version 2 must still read version 1. An older library that meets a
version it does not know (version 3, for a library from before signing), or bytes without the
magic, treats them as a miss and the next fill overwrites them.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .errors import ConfigurationError

__all__ = (
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MIN_KEY_BYTES",
    "SIGNED_FORMAT_VERSION",
    "SIGNED_HEADER_SIZE",
    "Record",
    "RecordError",
    "Signer",
    "header_of",
)

MAGIC = b"\xa7\xc6"
FORMAT_VERSION = 2
SIGNED_FORMAT_VERSION = 3
_HEADER_V1 = struct.Struct(">2sBBBdddf")
_HEADER = struct.Struct(">2sBBBdddfQ")
_FLAG_NEGATIVE = 0x01
#: Bytes before the payload (version 2). Every write has a distinct header (its times and a
#: random write id), so a header identifies one stored copy.
HEADER_SIZE = _HEADER.size
_SIGNATURE_SIZE = 32  # HMAC-SHA256
#: Bytes before the payload of a signed record (version 3): the header, then the signature.
SIGNED_HEADER_SIZE = HEADER_SIZE + _SIGNATURE_SIZE


def header_of(data: bytes) -> bytes:
    """The header of the stored copy ``data`` (its identity), whatever its version."""
    if len(data) > 2 and data[2] == 1:
        return data[: _HEADER_V1.size]
    return data[:HEADER_SIZE]  # version 3 too: its header is version 2's


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

    def encode(self, signer: Signer | None = None, rkey: bytes = b"") -> bytes:
        """The stored bytes; signed for the Redis key ``rkey`` when a ``signer`` is given."""
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION if signer is None else SIGNED_FORMAT_VERSION,
            _FLAG_NEGATIVE if self.negative else 0,
            self.serializer_tag,
            self.stored_at,
            self.soft_expires_at or 0.0,
            self.expires_at,
            self.compute_time,
            self.write_id,
        )
        if signer is None:
            return header + self.payload
        return header + signer.sign(rkey, header, self.payload) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """
        Read a record. A signed record's signature is not checked here: `Signer.verify` it
        first where it matters (before the payload is decoded).

        Raises:
            RecordError: the bytes are foreign, truncated, or of an unknown format version.
        """
        if len(data) < _HEADER_V1.size or data[:2] != MAGIC:
            raise RecordError("not an aiocacheguard record")
        version = data[2]
        if version == FORMAT_VERSION and len(data) >= _HEADER.size:
            _m, _v, flags, tag, stored_at, soft, hard, compute, write_id = _HEADER.unpack_from(data)
            payload = data[_HEADER.size :]
        elif version == SIGNED_FORMAT_VERSION and len(data) >= SIGNED_HEADER_SIZE:
            _m, _v, flags, tag, stored_at, soft, hard, compute, write_id = _HEADER.unpack_from(data)
            payload = data[SIGNED_HEADER_SIZE:]
        elif version == 1:
            _m, _v, flags, tag, stored_at, soft, hard, compute = _HEADER_V1.unpack_from(data)
            write_id, payload = 0, data[_HEADER_V1.size :]
        else:
            raise RecordError(
                f"record format version {version} is not readable by this version (or truncated)"
            )
        negative = bool(flags & _FLAG_NEGATIVE)
        if negative and payload:
            raise RecordError("negative record with a payload")
        return cls(payload, negative, tag, stored_at, hard, soft or None, compute, write_id)


#: The shortest signing key accepted: HMAC-SHA256's own output size (RFC 2104 asks for a key at
#: least as long as the hash's output).
MIN_KEY_BYTES: Final = 32
#: Prefixed to everything signed, so a key shared with some other use of HMAC-SHA256 cannot be
#: made to vouch for a record (and the record format can change what it signs later).
_DOMAIN: Final = b"aiocacheguard record v3\x00"


class _Redacted:
    """Stands for a secret in an error message: its size, never its bytes."""

    __slots__ = ("_text",)

    def __init__(self, value: object) -> None:
        size = len(value) if isinstance(value, bytes | bytearray | str) else None
        self._text = f"<{type(value).__name__}" + ("" if size is None else f" of {size}") + ">"

    def __repr__(self) -> str:
        return self._text


class Signer:
    """
    Signs records with HMAC-SHA256 and verifies them in constant time.

    Args:
        signing_key: Signs every record written, and verifies; at least `MIN_KEY_BYTES` bytes
            (``secrets.token_bytes(32)``).
        verify_keys: Keys whose records are still accepted but never written: the previous
            key during a rotation (or the next one, before it signs).

    Raises:
        ConfigurationError: a key is not bytes, or shorter than `MIN_KEY_BYTES`. The error
            gives the key's type and size, never the key.

    Example:
        >>> old, new = b"o" * 32, b"n" * 32
        >>> record = Record(b"1", False, 1, 0.0, 9e9).encode(Signer(old), b"k")
        >>> Signer(new, verify_keys=(old,)).verify(b"k", record)
        True
        >>> Signer(new).verify(b"k", record), Signer(old).verify(b"other key", record)
        (False, False)
    """

    __slots__ = ("_signing", "_verifying")

    def __init__(self, signing_key: bytes, verify_keys: Sequence[bytes] = ()) -> None:
        _check_key("signing_key", signing_key)
        given: object = verify_keys  # a lone key (bytes is a Sequence too) is a mistake
        if isinstance(given, bytes | bytearray | str) or not isinstance(given, Sequence):
            raise ConfigurationError(
                "verify_keys", _Redacted(given), "a sequence of keys, e.g. (old_key,)"
            )
        for key in verify_keys:
            _check_key("verify_keys", key)
        # Keyed once: each record then costs a copy of the keyed state, not a key schedule.
        self._signing = hmac.new(signing_key, _DOMAIN, "sha256")
        others = [hmac.new(key, _DOMAIN, "sha256") for key in verify_keys if key != signing_key]
        self._verifying = (self._signing, *others)

    def __repr__(self) -> str:
        return f"<Signer: 1 signing key, {len(self._verifying) - 1} more verify>"

    def sign(self, rkey: bytes, header: bytes, payload: bytes) -> bytes:
        """The signature of a record stored under ``rkey`` (the signing key's)."""
        mac = self._signing.copy()
        mac.update(_prefix(rkey) + header)
        mac.update(payload)
        return mac.digest()

    def verify(self, rkey: bytes, data: bytes) -> bool:
        """
        Whether ``data`` is a signed record (version 3) for ``rkey`` under one of the keys.
        Nothing of it is decoded before this says yes; each comparison is constant-time.
        """
        if len(data) < SIGNED_HEADER_SIZE or data[2] != SIGNED_FORMAT_VERSION or data[:2] != MAGIC:
            return False
        signed, payload = _prefix(rkey) + data[:HEADER_SIZE], data[SIGNED_HEADER_SIZE:]
        signature = data[HEADER_SIZE:SIGNED_HEADER_SIZE]
        for keyed in self._verifying:  # (a plain loop: this is on every signed hit's path)
            mac = keyed.copy()
            mac.update(signed)
            mac.update(payload)
            if hmac.compare_digest(mac.digest(), signature):
                return True
        return False


def _prefix(rkey: bytes) -> bytes:
    """The Redis key, length-prefixed: signed before the record, so no key runs into a header."""
    return len(rkey).to_bytes(4, "big") + rkey


def _check_key(field: str, key: object) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            field,
            _Redacted(key),
            f"bytes, at least {MIN_KEY_BYTES} of them (e.g. secrets.token_bytes(32)), "
            "the same in every process sharing the namespace",
        )
